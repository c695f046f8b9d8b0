"""kvmweb's KVM lab: simulated libvirt hosts on this one machine.

    import lab
    lab.up(2)                                   # lab-a 127.0.0.2, lab-b 127.0.0.3 (idempotent)
    uuid = lab.create_guest("t-web", host="lab-a", storage="shared")
    lab.wait_counter_moves("lab-a", "t-web")
    ...migrate with libvirt-python between lab.uri("lab-a") and lab.uri("lab-b")...
    lab.read_counter("lab-b", "t-web")
    lab.remove_guest("t-web")
    lab.down()

Every host sees shared storage at SHARED_IN_HOST (pool "shared", bindfs with the
glusterfs subtype so libvirt treats it as shared) and its own local storage at
LOCAL_IN_HOST (pool "images").  See lab/README.md.
"""

from .core import (
    HOST_NAMES,
    LAB_DIR,
    LIBVIRTD_TLS_PORT,
    LOCAL_IN_HOST,
    SHARED_IN_HOST,
    TRANSPORTS,
    LabError,
    authorize_ssh_key,
    check_prerequisites,
    fqdn,
    host_dir,
    ip,
    is_up,
    keep_running,
    local_dir,
    migration_ports,
    require_ssh,
    require_tls,
    running_hosts,
    session,
    shared_dir,
    skip_reason,
    ssh_host_key,
    ssh_ready,
    start_sshd,
    status,
    stop_sshd,
    tls_ready,
    up,
    uri,
)
from .core import down as _down
from .guests import (
    QUIET,
    claim,
    conn,
    create_guest,
    disk_path,
    read_counter,
    release,
    remove_guest,
    start_guest,
    sweep_orphans,
    virt_type,
    wait_counter_moves,
    where,
)
from .pki import CLIENT_DIRS


def down(purge: bool = False, hosts=None) -> list[str]:
    """Stop lab hosts (all by default); purge=True also deletes LAB_DIR.  See core.down."""
    from .guests import _forget_conns

    _forget_conns()
    return _down(purge=purge, hosts=hosts)


__all__ = [
    "CLIENT_DIRS",
    "QUIET",
    "LIBVIRTD_TLS_PORT",
    "TRANSPORTS",
    "authorize_ssh_key",
    "require_ssh",
    "require_tls",
    "ssh_host_key",
    "ssh_ready",
    "start_sshd",
    "stop_sshd",
    "tls_ready",
    "HOST_NAMES",
    "LAB_DIR",
    "LOCAL_IN_HOST",
    "SHARED_IN_HOST",
    "LabError",
    "check_prerequisites",
    "claim",
    "conn",
    "create_guest",
    "disk_path",
    "down",
    "fqdn",
    "host_dir",
    "ip",
    "is_up",
    "keep_running",
    "local_dir",
    "migration_ports",
    "read_counter",
    "release",
    "remove_guest",
    "running_hosts",
    "session",
    "shared_dir",
    "skip_reason",
    "start_guest",
    "status",
    "sweep_orphans",
    "up",
    "uri",
    "virt_type",
    "wait_counter_moves",
    "where",
]
