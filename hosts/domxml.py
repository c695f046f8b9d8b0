"""Reading a libvirt domain definition (XML) into plain data: the one parser behind the
inventory (hypervisor._domain_record) and the preflight checks (Context.guest). Pure
Python; no libvirt here."""

from __future__ import annotations

import xml.etree.ElementTree as ET


def parse_guest(xml):
    """The facts of a domain definition (a string or a parsed element), as plain data.

    A disk's ``path`` is what the checks compare (file, device, ``protocol:name`` of a
    network disk, ``pool/volume``); its ``source`` is the raw file, dev or name attribute
    the inventory stores."""
    root = ET.fromstring(xml) if isinstance(xml, str | bytes) else xml
    os_type = root.find("os/type")
    vcpu = root.find("vcpu")
    vcpu_max = int(vcpu.text) if vcpu is not None and vcpu.text else 1
    cpu = root.find("cpu")
    cpu_xml = ""
    if cpu is not None and (cpu.find("model") is not None or cpu.findall("feature")):
        cpu_xml = ET.tostring(cpu, encoding="unicode")
    disks = []
    for disk in root.findall("devices/disk"):
        source = disk.find("source")
        kind = disk.get("type", "file")
        path = ""
        if source is not None:
            if kind == "file":
                path = source.get("file", "")
            elif kind == "block":
                path = source.get("dev", "")
            elif kind == "network":
                path = f"{source.get('protocol', '')}:{source.get('name', '')}"
            elif kind == "volume":
                path = f"{source.get('pool', '')}/{source.get('volume', '')}"
        driver = disk.find("driver")
        target = disk.find("target")
        disks.append(
            {
                "dev": target.get("dev", "") if target is not None else "",
                "bus": target.get("bus", "") if target is not None else "",
                "kind_attr": disk.get("type", ""),
                "source": (source.get("file") or source.get("dev") or source.get("name") or "")
                if source is not None
                else "",
                "driver_cache": driver.get("cache", "") if driver is not None else "",
                "device": disk.get("device", "disk"),
                "kind": kind,
                "path": path,
                "format": driver.get("type", "") if driver is not None else "",
                "cache": (driver.get("cache") if driver is not None else None) or "default",
                "readonly": disk.find("readonly") is not None,
                "shareable": disk.find("shareable") is not None,
                "transient": disk.find("transient") is not None,
            }
        )
    interfaces = []
    for iface in root.findall("devices/interface"):
        source = iface.find("source")
        mac = iface.find("mac")
        model = iface.find("model")
        interfaces.append(
            {
                "type": iface.get("type", ""),
                "network": source.get("network", "") if source is not None else "",
                "bridge": source.get("bridge", "") if source is not None else "",
                "dev": source.get("dev", "") if source is not None else "",
                "mac": mac.get("address", "") if mac is not None else "",
                "model": model.get("type", "") if model is not None else "",
            }
        )
    nvram = root.find("os/nvram")
    nvram_path = ""
    if nvram is not None:
        nvram_path = (nvram.text or "").strip()
        src = nvram.find("source")
        if not nvram_path and src is not None:
            nvram_path = src.get("file", "")
    tpms = []
    for tpm in root.findall("devices/tpm"):
        backend = tpm.find("backend")
        tpms.append(
            {"model": tpm.get("model", ""), "backend": backend.get("type", "") if backend is not None else ""}
        )
    hostdevs = [
        {"mode": h.get("mode", "subsystem"), "type": h.get("type", "")}
        for h in root.findall("devices/hostdev")
    ]
    invtsc = any(
        f.get("name") == "invtsc" and f.get("policy", "require") in ("require", "force")
        for f in root.findall("cpu/feature")
    )
    tsc_frequency = any(t.get("frequency") for t in root.findall("clock/timer[@name='tsc']"))
    return {
        "name": root.findtext("name", ""),
        "virttype": root.get("type", "kvm"),
        "arch": os_type.get("arch", "") if os_type is not None else "",
        "machine": os_type.get("machine", "") if os_type is not None else "",
        "has_vcpu": vcpu is not None,
        "vcpu_max": vcpu_max,
        "vcpu_current": int(vcpu.get("current", vcpu_max)) if vcpu is not None else vcpu_max,
        "cpu_mode": (cpu.get("mode", "custom") if cpu is not None else ""),
        "cpu_mode_attr": (cpu.get("mode", "") if cpu is not None else ""),
        "cpu_check": (cpu.get("check", "") if cpu is not None else ""),
        "cpu_model": ((cpu.findtext("model") or "").strip() if cpu is not None else ""),
        "cpu_xml": cpu_xml,
        "disks": disks,
        "interfaces": interfaces,
        "nvram": nvram_path,
        "loader": (root.findtext("os/loader") or "").strip(),
        "tpms": tpms,
        "hostdevs": hostdevs,
        "vdpa": [i for i in interfaces if i["type"] == "vdpa"],
        "hostdev_interfaces": [i for i in interfaces if i["type"] == "hostdev"],
        "virtiofs": [
            (f.find("target").get("dir", "") if f.find("target") is not None else "")
            for f in root.findall("devices/filesystem")
            if f.find("driver") is not None and f.find("driver").get("type") == "virtiofs"
        ],
        # libvirt migrates only shmem devices with role='master' (and never legacy ivshmem).
        "shmem": [s.get("name", "") for s in root.findall("devices/shmem") if s.get("role") != "master"],
        "invtsc_without_frequency": invtsc and not tsc_frequency,
        "secrets": sorted({sec.get("uuid") for sec in root.iter("secret") if sec.get("uuid")}),
        "graphics_listen": sorted(
            {
                addr
                for g in root.findall("devices/graphics")
                for addr in [g.get("listen", "")] + [lst.get("address", "") for lst in g.findall("listen")]
                if addr and addr not in ("0.0.0.0", "::", "127.0.0.1", "::1", "localhost")
            }
        ),
        "redirdevs": len(root.findall("devices/redirdev")),
        "host_char_devices": [
            f"{c.tag} {c.get('type')}"
            for c in root.findall("devices/*")
            if c.tag in ("serial", "parallel", "channel", "console")
            and c.get("type") in ("dev", "file", "pipe")
        ],
    }
