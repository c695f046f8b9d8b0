"""hosts/domxml.py: the one domain-XML parser behind the inventory and the preflight."""

from hosts.domxml import parse_guest

XML = """<domain type='kvm'>
  <name>web1</name>
  <vcpu current='2'>4</vcpu>
  <os><type arch='x86_64' machine='pc-q35-8.2'>hvm</type></os>
  <cpu mode='host-model'><model>Skylake-Client</model></cpu>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='none'/>
      <source file='/var/lib/libvirt/images/web1.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <disk type='network' device='disk'><source protocol='rbd' name='pool/web1-data'/>
      <target dev='vdb' bus='virtio'/></disk>
    <disk type='volume' device='cdrom'><source pool='isos' volume='boot.iso'/>
      <target dev='sda' bus='sata'/><readonly/></disk>
    <interface type='network'><mac address='52:54:00:00:00:01'/><source network='default'/>
      <model type='virtio'/></interface>
    <hostdev mode='subsystem' type='pci'/>
  </devices>
</domain>"""


def test_it_gives_the_checks_and_the_inventory_their_views_of_each_disk():
    g = parse_guest(XML)
    vda, vdb, sda = g["disks"]
    # The checks compare "path" (protocol:name for a network disk, pool/volume for a volume).
    assert (vda["path"], vdb["path"], sda["path"]) == (
        "/var/lib/libvirt/images/web1.qcow2",
        "rbd:pool/web1-data",
        "isos/boot.iso",
    )
    # The inventory stores the raw source attribute, the bus and the cache as written.
    assert (vda["source"], vdb["source"], sda["source"]) == (
        "/var/lib/libvirt/images/web1.qcow2",
        "pool/web1-data",
        "",
    )
    assert (vda["bus"], vda["driver_cache"], vdb["driver_cache"], vdb["cache"]) == (
        "virtio",
        "none",
        "",
        "default",
    )
    assert sda["readonly"] and sda["device"] == "cdrom"
    assert g["interfaces"][0]["model"] == "virtio" and g["interfaces"][0]["network"] == "default"
    assert (g["vcpu_max"], g["vcpu_current"], g["cpu_mode"], g["cpu_model"]) == (
        4,
        2,
        "host-model",
        "Skylake-Client",
    )
    assert len(g["hostdevs"]) == 1 and g["machine"] == "pc-q35-8.2"


def test_it_tells_a_cpu_without_mode_from_no_cpu_element():
    with_cpu = parse_guest("<domain><cpu><model>qemu64</model></cpu></domain>")
    without = parse_guest("<domain/>")
    assert (with_cpu["cpu_mode"], with_cpu["cpu_mode_attr"]) == ("custom", "")  # libvirt's default mode
    assert (without["cpu_mode"], without["has_vcpu"], without["vcpu_current"]) == ("", False, 1)
