"""The gateway to libvirt: the only module in kvmweb that imports libvirt.

Everything above this module works with plain dicts and the exceptions defined here.
Rules kept here so nobody else has to remember them:

* Every connect and every operation is bounded by a timeout (settings
  LIBVIRT_CONNECT_TIMEOUT / LIBVIRT_CALL_TIMEOUT). libvirt calls block and cannot be
  interrupted, so an operation runs in a daemon thread and the caller stops waiting when
  the timeout passes; the abandoned connection is closed when (if) the call returns.
  An unreachable or hanging host therefore never hangs a page or a worker.
* libvirt errors become HypervisorError with a message a person can act on.
* Never call this from async code: wrap it in sync_to_async / a worker thread.
* libvirt's default error handler prints every error to stderr; we silence it and read
  the exception instead.
* The libvirt event loop is registered before the first connection is opened (pitfall:
  callbacks and keepalive never fire otherwise).
"""

import logging
import threading
import xml.etree.ElementTree as ET
from contextlib import contextmanager

import libvirt
from django.conf import settings
from django.utils.translation import gettext as _

from hosts.domxml import parse_guest

log = logging.getLogger(__name__)

libvirt.registerErrorHandler(lambda ctx, err: None, None)

# ----------------------------------------------------- migrate flags and params
# (used by migrations_app/plan.py, which must not import libvirt)

MIGRATE_FLAGS = {
    "live": libvirt.VIR_MIGRATE_LIVE,
    "peer2peer": libvirt.VIR_MIGRATE_PEER2PEER,
    "tunnelled": libvirt.VIR_MIGRATE_TUNNELLED,
    "persist_dest": libvirt.VIR_MIGRATE_PERSIST_DEST,
    "undefine_source": libvirt.VIR_MIGRATE_UNDEFINE_SOURCE,
    "paused": libvirt.VIR_MIGRATE_PAUSED,
    "non_shared_disk": libvirt.VIR_MIGRATE_NON_SHARED_DISK,
    "non_shared_inc": libvirt.VIR_MIGRATE_NON_SHARED_INC,
    "change_protection": libvirt.VIR_MIGRATE_CHANGE_PROTECTION,
    "unsafe": libvirt.VIR_MIGRATE_UNSAFE,
    "offline": libvirt.VIR_MIGRATE_OFFLINE,
    "compressed": libvirt.VIR_MIGRATE_COMPRESSED,
    "abort_on_error": libvirt.VIR_MIGRATE_ABORT_ON_ERROR,
    "auto_converge": libvirt.VIR_MIGRATE_AUTO_CONVERGE,
    "postcopy": libvirt.VIR_MIGRATE_POSTCOPY,
    "parallel": libvirt.VIR_MIGRATE_PARALLEL,
    "tls": libvirt.VIR_MIGRATE_TLS,  # QEMU's memory/disk stream over TLS (virsh migrate --tls)
}
# Typed parameters of migrateToURI3 (names are libvirt's strings, e.g. "bandwidth").
# Max downtime is NOT a migrate parameter: it is set with migrateSetMaxDowntime() once the
# job runs; the completion timeout is enforced by kvmweb's runner, not by libvirt.
MIGRATE_PARAMS = {
    "bandwidth": libvirt.VIR_MIGRATE_PARAM_BANDWIDTH,  # MiB/s (ulong)
    "parallel_connections": libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS,  # int
    "uri": libvirt.VIR_MIGRATE_PARAM_URI,  # string: the data-stream URI (tcp://addr)
    "dest_name": libvirt.VIR_MIGRATE_PARAM_DEST_NAME,
    "dest_xml": libvirt.VIR_MIGRATE_PARAM_DEST_XML,
    "persist_xml": libvirt.VIR_MIGRATE_PARAM_PERSIST_XML,
    "migrate_disks": libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS,  # list of target devs
    "compression": libvirt.VIR_MIGRATE_PARAM_COMPRESSION,
    "bandwidth_postcopy": libvirt.VIR_MIGRATE_PARAM_BANDWIDTH_POSTCOPY,
}

# ---------------------------------------------------------------------------- errors


class HypervisorError(Exception):
    """A libvirt operation failed. ``str(exc)`` is meant for people; ``remedy`` says
    what to do about it; ``code`` is libvirt's error code (or None)."""

    def __init__(self, message, *, code=None, remedy=""):
        super().__init__(message)
        self.message = message
        self.code = code
        self.remedy = remedy


class HypervisorTimeout(HypervisorError):
    """The host did not answer within the timeout."""


class DomainNotFound(HypervisorError):
    """No domain with that UUID or name on this host."""


class TLSCertificateError(HypervisorError):
    """A qemu+tls connection failed on a certificate (expired, untrusted, missing, or
    issued for another name); ``problem`` names which, the remedy says what to renew."""

    def __init__(self, message, *, problem, **kwargs):
        super().__init__(message, **kwargs)
        self.problem = problem


class SSHError(HypervisorError):
    """An SSH connection failed on the host key or the login; ``problem`` is one of
    "host_key_unknown", "host_key_changed", "auth_rejected", "key_unreadable", "sshd_down"."""

    def __init__(self, message, *, problem, **kwargs):
        super().__init__(message, **kwargs)
        self.problem = problem


def _ssh_problem(lowered):
    """Which SSH problem a libvirt message (libssh2/libssh transports or ssh binary) describes."""
    if "host key verification failed" in lowered and "differs from stored identity" in lowered:
        return "host_key_changed"
    if "can't verify the session host key" in lowered or "host key verification failed" in lowered:
        return "host_key_unknown"
    if "error while reading private key" in lowered or "can't retrieve private key passphrase" in lowered:
        return "key_unreadable"
    if (
        "authentication methods with credentials were rejected" in lowered
        or "permission denied (publickey" in lowered
    ):
        return "auth_rejected"
    return ""


def _explain_ssh(problem, raw, uri):
    texts = {
        "host_key_unknown": (
            _("The SSH host key of %(uri)s is not confirmed in kvmweb's known_hosts."),
            _(
                'Run "Test connection" in the Add host wizard, compare the fingerprint with '
                "`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` on the host and confirm it."
            ),
        ),
        "host_key_changed": (
            _(
                "The SSH host key of %(uri)s has CHANGED since it was confirmed; kvmweb does not connect: %(raw)s"
            ),
            _(
                "If the host was reinstalled or its keys were regenerated, check the new fingerprint on the "
                'host console and use "Replace host key" on the host\'s page; otherwise treat it as an attack.'
            ),
        ),
        "auth_rejected": (
            _("The host %(uri)s rejected kvmweb's SSH key."),
            _(
                "Append kvmweb's public key (Hosts page) to ~/.ssh/authorized_keys of the URI's user on the "
                "host; for peer-to-peer migration every source host's libvirtd uses the same key."
            ),
        ),
        "key_unreadable": (
            _("kvmweb cannot read the SSH key named in %(uri)s: %(raw)s"),
            _("Generate kvmweb's SSH key on the Hosts page, or set KVMWEB_SSH_KEY_FILE to a readable key."),
        ),
    }
    message, remedy = texts[problem]
    if problem in ("host_key_unknown", "host_key_changed") and str(uri).startswith("qemu+ssh:"):
        # The ssh binary ignores the URI's known_hosts: kvmweb's confirmations do not apply.
        remedy = _(
            "qemu+ssh runs the ssh program, which checks ~/.ssh/known_hosts of the user kvmweb runs as: "
            "put the host's key there after comparing its fingerprint, or add the host with the wizard "
            "(qemu+libssh2), where kvmweb's confirmed keys apply."
        )
    return message % {"uri": uri, "raw": raw}, remedy


def _tls_problem(lowered):
    """Which certificate problem a libvirt/GnuTLS message describes, or ""."""
    if "certificate" not in lowered and ".pem" not in lowered:
        return ""
    if "expired" in lowered:
        return "expired"
    if "not yet activated" in lowered or "not yet valid" in lowered:
        return "not_yet_valid"
    if "known issuer" in lowered or "not trusted" in lowered or "failed validation" in lowered:
        return "untrusted"
    if "does not match the hostname" in lowered or "owner does not match" in lowered:
        return "hostname"
    if "cannot read" in lowered or "cannot access" in lowered or "no such file" in lowered:
        return "missing"
    if "revoked" in lowered:
        return "revoked"
    return ""


def _explain_tls(problem, raw, uri):
    texts = {
        "expired": (
            _("TLS certificate expired for %(uri)s: %(raw)s"),
            _(
                "Issue a new certificate from the CA the hosts trust and install it where the message says "
                "(kvmweb's client certificate is in the URI's pkipath directory, or /etc/pki/libvirt); "
                "a host's server certificate lives in /etc/pki/libvirt/servercert.pem: restart libvirtd after."
            ),
        ),
        "not_yet_valid": (
            _("TLS certificate not valid yet for %(uri)s: %(raw)s"),
            _(
                "Check the clocks of kvmweb's machine and the host (NTP); the certificate's start date is ahead."
            ),
        ),
        "untrusted": (
            _("TLS certificate not trusted for %(uri)s: %(raw)s"),
            _(
                "The certificate was signed by a CA the other side does not know: put the signing CA in "
                "cacert.pem on both sides, or issue the certificate from the CA the host trusts."
            ),
        ),
        "hostname": (
            _("TLS certificate issued for another name than %(uri)s: %(raw)s"),
            _(
                "Connect with the name or address the host's server certificate lists (its subjectAltName), "
                "or reissue the certificate with this name."
            ),
        ),
        "missing": (
            _("TLS certificate files missing for %(uri)s: %(raw)s"),
            _(
                "Install cacert.pem, clientcert.pem and clientkey.pem (0600) in the URI's pkipath directory "
                "(default /etc/pki/CA and /etc/pki/libvirt), readable by the user kvmweb runs as."
            ),
        ),
        "revoked": (
            _("TLS certificate revoked for %(uri)s: %(raw)s"),
            _("Issue and install a new certificate; the revoked one cannot be used again."),
        ),
    }
    message, remedy = texts[problem]
    if problem in ("expired", "untrusted", "missing"):
        remedy += " " + _(
            "An administrator can give kvmweb a new certificate on the host's TLS certificate page."
        )
    return message % {"uri": uri, "raw": raw}, remedy


def _explain(exc, uri, what):
    """Turn a libvirtError into a HypervisorError a person can act on."""
    code = exc.get_error_code()
    raw = (exc.get_error_message() or str(exc)).strip()
    lowered = raw.lower()
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return DomainNotFound(
            _("%(what)s: no such VM on %(uri)s (%(raw)s)") % {"what": what, "uri": uri, "raw": raw}, code=code
        )
    ssh_problem = _ssh_problem(lowered)
    if ssh_problem:
        message, remedy = _explain_ssh(ssh_problem, raw, uri)
        return SSHError(message, problem=ssh_problem, code=code, remedy=remedy)
    problem = _tls_problem(lowered)
    if problem:
        message, remedy = _explain_tls(problem, raw, uri)
        return TLSCertificateError(message, problem=problem, code=code, remedy=remedy)
    if "connection refused" in lowered and str(uri).startswith(
        ("qemu+ssh:", "qemu+libssh2:", "qemu+libssh:")
    ):
        return SSHError(
            _("Cannot reach the SSH server of %(uri)s: connection refused.") % {"uri": uri},
            problem="sshd_down",
            code=code,
            remedy=_(
                "Start sshd on the host (systemctl start ssh) and check that it listens on the URI's port "
                "and that no firewall blocks it."
            ),
        )
    if "connection refused" in lowered:
        return HypervisorError(
            _("Cannot reach libvirtd at %(uri)s: connection refused.") % {"uri": uri},
            code=code,
            remedy=_(
                "Check that libvirtd (or virtproxyd) runs on the host and listens on "
                "this transport and port, and that no firewall blocks it."
            ),
        )
    if "no route to host" in lowered or "network is unreachable" in lowered:
        return HypervisorError(
            _("Cannot reach %(uri)s: no network route to the host.") % {"uri": uri},
            code=code,
            remedy=_("Check the host address and the network between kvmweb and the host."),
        )
    if "name or service not known" in lowered or "could not resolve" in lowered:
        return HypervisorError(
            _("Cannot resolve the host name in %(uri)s.") % {"uri": uri},
            code=code,
            remedy=_("Use a name that resolves from the kvmweb machine, or an IP address."),
        )
    if code in (libvirt.VIR_ERR_AUTH_FAILED, libvirt.VIR_ERR_AUTH_CANCELLED) or ("authentication" in lowered):
        return HypervisorError(
            _("libvirt at %(uri)s refused the credentials: %(raw)s") % {"uri": uri, "raw": raw},
            code=code,
            remedy=_("Check the SSH key or TLS client certificate kvmweb uses for this host."),
        )
    if code == libvirt.VIR_ERR_NO_SUPPORT:
        return HypervisorError(
            _("%(what)s is not supported by %(uri)s: %(raw)s") % {"what": what, "uri": uri, "raw": raw},
            code=code,
        )
    if code == libvirt.VIR_ERR_OPERATION_ABORTED:
        return HypervisorError(_("%(what)s was aborted: %(raw)s") % {"what": what, "raw": raw}, code=code)
    return HypervisorError(
        _("%(what)s failed on %(uri)s: %(raw)s") % {"what": what, "uri": uri, "raw": raw}, code=code
    )


# ------------------------------------------------------------------ bounded calls


def _bounded(fn, timeout, what):
    """Run fn() in a daemon thread; give up waiting after ``timeout`` seconds."""
    box = {}
    done = threading.Event()

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=target, name=f"libvirt: {what}", daemon=True).start()
    if not done.wait(timeout):
        raise HypervisorTimeout(
            _("%(what)s did not answer within %(timeout)s s.") % {"what": what, "timeout": f"{timeout:g}"},
            remedy=_("The host or its libvirtd may be overloaded or hung; check it and retry."),
        )
    if "error" in box:
        raise box["error"]
    return box.get("value")


_event_loop_lock = threading.Lock()
_event_loop_started = False


def ensure_event_loop():
    """Register libvirt's default event implementation and run it in a daemon thread.

    Must happen before connections are opened: keepalive and domain event callbacks only
    work on connections opened after registration.
    """
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run():
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


# ------------------------------------------------------------------ connections


class HostConnection:
    """An open libvirt connection whose every operation has a timeout.

    Use ``with connect(uri) as conn:``. ``conn.call(what, fn)`` runs ``fn(virConnect)``
    bounded by the call timeout and translates errors; the higher-level methods below
    return plain data.
    """

    def __init__(self, uri, raw, call_timeout):
        self.uri = uri
        self._raw = raw
        self.call_timeout = call_timeout
        self._abandoned = False

    def call(self, what, fn, timeout=None):
        if self._abandoned:
            raise HypervisorError(
                _("%(what)s: the connection to %(uri)s was abandoned after a timeout.")
                % {"what": what, "uri": self.uri}
            )
        try:
            return _bounded(lambda: fn(self._raw), timeout or self.call_timeout, what)
        except HypervisorTimeout:
            # The thread may still be inside libvirt using this connection: do not reuse
            # it, and close it only from that thread's side (close() below is skipped).
            self._abandoned = True
            raise
        except libvirt.libvirtError as exc:
            raise _explain(exc, self.uri, what) from None

    def close(self):
        if self._abandoned:
            return
        try:
            self._raw.close()
        except libvirt.libvirtError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- host facts and inventory ------------------------------------------------

    def facts(self):
        """Hostname, host UUID, CPU, memory, versions, transports, pools and networks."""
        return self.call(_("Reading host facts"), _read_facts)

    def domains(self):
        """Every domain on the host as an inventory record (see _domain_record)."""
        return self.call(_("Listing VMs"), _read_domains)

    def domain_record(self, uuid):
        """The inventory record of one domain, or raise DomainNotFound."""
        return self.call(_("Reading VM"), lambda c: _domain_record(c.lookupByUUIDString(str(uuid))))

    def domain_xml(self, uuid, migratable=False, inactive=False):
        flags = 0
        if migratable:
            flags |= libvirt.VIR_DOMAIN_XML_MIGRATABLE
        if inactive:
            flags |= libvirt.VIR_DOMAIN_XML_INACTIVE
        return self.call(_("Reading VM definition"), lambda c: c.lookupByUUIDString(str(uuid)).XMLDesc(flags))

    def domain_state(self, uuid):
        """(state name, reason name) of a domain, or raise DomainNotFound."""

        def read(c):
            state, reason = c.lookupByUUIDString(str(uuid)).state()
            return _state_names(state, reason)

        return self.call(_("Reading VM state"), read)

    def find_domain(self, uuid):
        """(state, reason) when the domain exists on this host, else None."""
        try:
            return self.domain_state(uuid)
        except DomainNotFound:
            return None

    # -- preflight queries (migrations_app/preflight/) ------------------------
    # Each returns plain data for migrations_app/preflight/. They are safe to call from
    # several threads at once on one connection (libvirt connections are thread-safe).

    def is_alive(self):
        """True when the connection still answers (virConnectIsAlive)."""
        return bool(self.call(_("Checking the connection"), lambda c: c.isAlive()))

    def preflight_host(self):
        """Host UUID, hostname, arch, versions, free memory, CPUs and the guest
        architectures, machine types and domain types the hypervisor offers."""

        def read(c):
            caps = ET.fromstring(c.getCapabilities())
            host = caps.find("host")
            guests = {}
            for guest in caps.findall("guest"):
                arch = guest.find("arch")
                if arch is None:
                    continue
                entry = guests.setdefault(arch.get("name"), {"machines": set(), "domain_types": set()})
                for machine in arch.iter("machine"):
                    entry["machines"].add(machine.text)
                    if machine.get("canonical"):
                        entry["machines"].add(machine.get("canonical"))
                for domain in arch.findall("domain"):
                    entry["domain_types"].add(domain.get("type"))
            info = c.getInfo()
            try:
                free = c.getFreeMemory()
            except libvirt.libvirtError:
                free = None
            try:
                hostname = c.getHostname()
            except libvirt.libvirtError:
                hostname = ""
            return {
                "host_uuid": _text(host, "uuid"),
                "hostname": hostname,
                "arch": _text(host, "cpu/arch") or info[0],
                "cpu_vendor": _text(host, "cpu/vendor"),
                "cpu_model": _text(host, "cpu/model"),
                "cpus": info[2],
                "memory_free": free,
                "libvirt_version": c.getLibVersion(),
                "hypervisor_version": c.getVersion(),
                "hypervisor_type": c.getType(),
                "guests": {
                    name: {"machines": sorted(g["machines"]), "domain_types": sorted(g["domain_types"])}
                    for name, g in guests.items()
                },
            }

        return self.call(_("Reading host facts"), read)

    def preflight_domain(self, uuid):
        """Everything the checklist needs to know about one domain on this (source) host:
        state, persistence, the migratable XML, running jobs and block jobs, snapshots,
        checkpoints, managed save, memory and per-disk sizes. Raises DomainNotFound."""

        def read(c):
            dom = c.lookupByUUIDString(str(uuid))
            state, reason = _state_names(*dom.state())
            active = bool(dom.isActive())
            xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE)
            job_type = 0
            block_jobs = {}
            rss = None
            if active:
                try:
                    job_type = dom.jobInfo()[0]
                except libvirt.libvirtError:
                    job_type = None  # unknown (e.g. the test driver cannot tell)
                try:
                    rss = dict(dom.memoryStats()).get("rss")
                except libvirt.libvirtError:
                    rss = None
            disks = {}
            for disk in parse_guest(xml)["disks"]:
                dev = disk["dev"]
                if not dev:
                    continue
                if active:
                    try:
                        info = dom.blockJobInfo(dev, 0)
                    except libvirt.libvirtError:
                        info = {}
                    if info:
                        block_jobs[dev] = {k: int(v) for k, v in info.items()}
                try:
                    capacity, allocation, physical = dom.blockInfo(dev)
                    disks[dev] = {"capacity": capacity, "allocation": allocation, "physical": physical}
                except libvirt.libvirtError:
                    disks[dev] = {}
            try:
                snapshots = sorted(dom.snapshotListNames(0))
            except libvirt.libvirtError:
                snapshots = []
            try:
                checkpoints = sorted(cp.getName() for cp in dom.listAllCheckpoints(0))
            except (libvirt.libvirtError, AttributeError):
                checkpoints = []
            try:
                managed_save = bool(dom.hasManagedSaveImage(0))
            except libvirt.libvirtError:
                managed_save = False
            return {
                "uuid": dom.UUIDString(),
                "name": dom.name(),
                "state": state,
                "state_reason": reason,
                "active": active,
                "persistent": bool(dom.isPersistent()),
                "xml": xml,
                "job_type": job_type,
                "block_jobs": block_jobs,
                "snapshots": snapshots,
                "checkpoints": checkpoints,
                "managed_save": managed_save,
                "memory": int(dom.maxMemory()) * 1024,
                "rss": int(rss) * 1024 if rss else None,
                "disk_sizes": disks,
            }

        return self.call(_("Reading the VM for preflight"), read)

    def domain_capabilities(self, arch, machine, virttype, emulator=None):
        """What this host's hypervisor offers for (arch, machine, virttype): the canonical
        machine name, the vCPU maximum and the host-model CPU as a full <cpu> XML (for
        compareHypervisorCPU). Raises HypervisorError when the combination is unsupported."""

        def read(c):
            root = ET.fromstring(c.getDomainCapabilities(emulator, arch, machine, virttype, 0))
            vcpu = root.find("vcpu")
            host_model = root.find("cpu/mode[@name='host-model']")
            cpu_xml = ""
            if host_model is not None and host_model.get("supported") == "yes":
                cpu = ET.Element("cpu", {"mode": "custom", "match": "exact"})
                for child in host_model:
                    cpu.append(child)
                cpu_xml = ET.tostring(cpu, encoding="unicode")
            modes = [m.get("name") for m in root.findall("cpu/mode") if m.get("supported") == "yes"]
            return {
                "path": _text(root, "path"),
                "machine": _text(root, "machine"),
                "arch": _text(root, "arch"),
                "vcpu_max": int(vcpu.get("max")) if vcpu is not None and vcpu.get("max") else None,
                "host_model_cpu": cpu_xml,
                "cpu_modes": modes,
            }

        return self.call(_("Reading domain capabilities"), read)

    def compare_cpu(self, cpu_xml, arch, machine, virttype, emulator=None):
        """compareHypervisorCPU of a <cpu> definition on this host: a dict with result
        ('incompatible' | 'identical' | 'superset') and libvirt's reason when incompatible
        (the missing features)."""
        names = {
            libvirt.VIR_CPU_COMPARE_INCOMPATIBLE: "incompatible",
            libvirt.VIR_CPU_COMPARE_IDENTICAL: "identical",
            libvirt.VIR_CPU_COMPARE_SUPERSET: "superset",
        }

        def read(c):
            try:
                code = c.compareHypervisorCPU(
                    emulator,
                    arch,
                    machine,
                    virttype,
                    cpu_xml,
                    libvirt.VIR_CONNECT_COMPARE_CPU_FAIL_INCOMPATIBLE,
                )
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_CPU_INCOMPATIBLE:
                    return {"result": "incompatible", "reason": (exc.get_error_message() or "").strip()}
                raise
            return {"result": names.get(code, str(code)), "reason": ""}

        return self.call(_("Comparing the CPU"), read)

    def max_vcpus(self, virttype):
        """getMaxVcpus(virttype) of this host, or None when libvirt cannot tell."""

        def read(c):
            try:
                return c.getMaxVcpus(virttype)
            except libvirt.libvirtError:
                return None

        return self.call(_("Reading the vCPU limit"), read)

    def networks_status(self, names):
        """{network name: {exists, active, bridge, autostart}} for libvirt networks."""

        def read(c):
            out = {}
            for name in names:
                try:
                    net = c.networkLookupByName(name)
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() != libvirt.VIR_ERR_NO_NETWORK:
                        raise
                    out[name] = {"exists": False, "active": False, "bridge": "", "autostart": False}
                    continue
                active = bool(net.isActive())
                try:
                    bridge = net.bridgeName() if active else ""
                except libvirt.libvirtError:
                    bridge = ""
                out[name] = {
                    "exists": True,
                    "active": active,
                    "bridge": bridge,
                    "autostart": bool(net.autostart()),
                }
            return out

        return self.call(_("Looking up networks"), read)

    def host_interfaces(self):
        """Names of the host's network devices (bridges, NICs) as libvirt sees them, from
        the interface driver and the node-device list; None when neither can tell."""

        def read(c):
            names, answered = set(), False
            try:
                names |= {i.name() for i in c.listAllInterfaces(0)}
                answered = True
            except libvirt.libvirtError:
                pass
            try:
                for dev in c.listAllDevices(libvirt.VIR_CONNECT_LIST_NODE_DEVICES_CAP_NET):
                    iface = ET.fromstring(dev.XMLDesc(0)).find("capability/interface")
                    if iface is not None and iface.text:
                        names.add(iface.text.strip())
                answered = True
            except libvirt.libvirtError:
                pass
            return sorted(names) if answered else None

        return self.call(_("Listing host network devices"), read)

    def storage_lookup(self, paths):
        """For each path: whether this host sees a storage volume there (and its sizes),
        and the storage pool whose target directory holds the path (for pre-creating a
        copy). A pool that does not list a volume yet is refreshed once: files created
        after its last refresh are otherwise invisible to storageVolLookupByPath."""
        import os.path

        def pool_record(pool):
            _state, capacity, allocation, available = pool.info()
            return {
                "name": pool.name(),
                "active": bool(pool.isActive()),
                "capacity": capacity,
                "available": available,
            }

        def read(c):
            out = {}
            for path in paths:
                entry = {
                    "visible": False,
                    "capacity": None,
                    "allocation": None,
                    "pool": None,
                    "dir_pool": None,
                }
                try:
                    dir_pool = c.storagePoolLookupByTargetPath(os.path.dirname(path))
                    entry["dir_pool"] = pool_record(dir_pool)
                except libvirt.libvirtError:
                    dir_pool = None
                vol = None
                try:
                    vol = c.storageVolLookupByPath(path)
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_VOL:
                        raise
                    if dir_pool is not None and dir_pool.isActive():
                        try:
                            dir_pool.refresh(0)
                            vol = c.storageVolLookupByPath(path)
                        except libvirt.libvirtError:
                            vol = None
                if vol is not None:
                    _type, capacity, allocation = vol.info()
                    entry.update(visible=True, capacity=capacity, allocation=allocation)
                    try:
                        entry["pool"] = vol.storagePoolLookupByVolume().name()
                    except libvirt.libvirtError:
                        pass
                out[path] = entry
            return out

        return self.call(_("Looking up storage"), read)

    def probe_shared(self, target, directories):
        """Whether ``target`` (a HostConnection) sees what this host writes in each
        directory: {directory: True | False | None}, see probe_shared()."""
        return probe_shared(self, target, directories)

    def secrets_present(self, uuids):
        """{secret UUID: True/False}: whether this host holds each libvirt secret (disk
        encryption passphrases, RBD/iSCSI credentials referenced by a domain)."""

        def read(c):
            out = {}
            for uuid in uuids:
                try:
                    c.secretLookupByUUIDString(uuid)
                    out[uuid] = True
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() != libvirt.VIR_ERR_NO_SECRET:
                        raise
                    out[uuid] = False
            return out

        return self.call(_("Looking up secrets"), read)

    def domain_collisions(self, uuid, name):
        """Domains on this host that share the UUID or the name of a VM:
        {"by_uuid": {...} | None, "by_name": {...} | None}."""

        def describe(dom):
            state, reason = _state_names(*dom.state())
            return {
                "name": dom.name(),
                "uuid": dom.UUIDString(),
                "state": state,
                "state_reason": reason,
                "persistent": bool(dom.isPersistent()),
            }

        def read(c):
            found = {"by_uuid": None, "by_name": None}
            for key, lookup in (
                ("by_uuid", lambda: c.lookupByUUIDString(str(uuid))),
                ("by_name", lambda: c.lookupByName(name)),
            ):
                try:
                    found[key] = describe(lookup())
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                        raise
            return found

        return self.call(_("Looking for name/UUID collisions"), read)

    def measure_dirty_rate(self, uuid, seconds=1, mode="page-sampling"):
        """Measure how fast the running guest dirties its RAM (virDomainStartDirtyRateCalc,
        libvirt >= 7.2, QEMU >= 5.2). Returns {"mib_per_s", "mode", "period"}; raises
        HypervisorError (code VIR_ERR_NO_SUPPORT...) where the host cannot measure."""
        import time

        flags = {
            "page-sampling": 0,
            "dirty-bitmap": libvirt.VIR_DOMAIN_DIRTYRATE_MODE_DIRTY_BITMAP,
            "dirty-ring": libvirt.VIR_DOMAIN_DIRTYRATE_MODE_DIRTY_RING,
        }[mode]
        seconds = max(1, int(seconds))
        self.call(
            _("Starting the dirty-rate measurement"),
            lambda c: c.lookupByUUIDString(str(uuid)).startDirtyRateCalc(seconds, flags),
        )

        def read(c):
            dom = c.lookupByUUIDString(str(uuid))
            return c.domainListGetStats([dom], libvirt.VIR_DOMAIN_STATS_DIRTYRATE)[0][1]

        time.sleep(seconds)
        deadline = time.monotonic() + max(2.0, seconds)
        while True:
            stats = self.call(_("Reading the dirty rate"), read)
            if stats.get("dirtyrate.calc_status") == libvirt.VIR_DOMAIN_DIRTYRATE_MEASURED:
                return {
                    "mib_per_s": int(stats.get("dirtyrate.megabytes_per_second", 0)),
                    "mode": stats.get("dirtyrate.calc_mode", mode),
                    "period": int(stats.get("dirtyrate.calc_period", seconds)),
                }
            if time.monotonic() > deadline:
                raise HypervisorTimeout(_("The dirty-rate measurement did not finish in time."))
            time.sleep(0.02)

    # -- migration (owned by the migration-jobs engineer) -------------------------
    #
    # The migration runner opens two connections to the source: one whose helper thread
    # blocks in migrateToURI3 (or a volume copy) for the whole migration, and one for the
    # ~4/s job-stats polls and the controls. libvirt connections are thread-safe, but a
    # poll that times out abandons its connection; keeping them apart means a slow poll
    # never takes the migration's connection with it.

    def migrate(self, uuid, dest_uri, flags, params, timeout=None):
        """Blocking ``migrateToURI3`` of the domain to ``dest_uri``.

        With PEER2PEER the source libvirtd connects to ``dest_uri`` and drives the whole
        migration itself, so it carries on (and concludes) even if this process dies.
        Bounded only by the migration limit: call it from a helper thread.
        """

        def run(c):
            c.lookupByUUIDString(str(uuid)).migrateToURI3(dest_uri, dict(params), int(flags))

        return self.call(_("Migration"), run, timeout=timeout or settings.MIGRATION_TIMEOUT)

    def job_stats(self, uuid, completed=False):
        """jobStats() of the domain as a plain dict; ``type`` is the job type name
        ("none", "bounded", "unbounded", "completed", "failed", "cancelled").

        Only the source of a migration has live stats; ``completed=True`` reads the
        statistics of the last completed job (on the target after a migration)."""

        def read(c):
            dom = c.lookupByUUIDString(str(uuid))
            flags = libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED if completed else 0
            stats = dict(dom.jobStats(flags))
            stats["type"] = JOB_TYPES.get(stats.get("type", 0), str(stats.get("type")))
            return stats

        return self.call(_("Reading migration progress"), read)

    def migration_snapshot(self, uuid):
        """One poll of a running migration: (job stats dict, (state, reason))."""

        def read(c):
            dom = c.lookupByUUIDString(str(uuid))
            stats = dict(dom.jobStats(0))
            stats["type"] = JOB_TYPES.get(stats.get("type", 0), str(stats.get("type")))
            return stats, _state_names(*dom.state())

        return self.call(_("Reading migration progress"), read)

    def watch_migration_passes(self, uuid, callback, timeout=None):
        """Call ``callback(iteration)`` each time a migration of domain ``uuid`` begins
        a pass over memory (libvirt's migration-iteration event, from QEMU's
        MIGRATION_PASS: iteration 1 as the stream starts, once QEMU runs on the target,
        then each further pass). Returns the handle for unwatch().

        It runs on libvirt's event loop thread (ensure_event_loop), which also answers
        the keepalives of every connection: it must return at once. An exception in it
        is logged, never raised into libvirt."""

        def on_pass(_conn, _dom, iteration, _opaque):
            try:
                callback(iteration)
            except Exception:
                log.exception("migration-pass callback failed")

        return self.call(
            _("Watching the migration's passes"),
            lambda c: c.domainEventRegisterAny(
                c.lookupByUUIDString(str(uuid)),
                libvirt.VIR_DOMAIN_EVENT_ID_MIGRATION_ITERATION,
                on_pass,
                None,
            ),
            timeout=timeout,
        )

    def unwatch(self, handle, timeout=None):
        """Stop a watch_migration_passes(); a connection that went away meanwhile took
        its callbacks with it."""
        try:
            self.call(_("Stopping a watch"), lambda c: c.domainEventDeregisterAny(handle), timeout=timeout)
        except HypervisorError:
            pass

    def abort_job(self, uuid):
        """Abort the domain's running job (the migrate call then fails with
        VIR_ERR_OPERATION_ABORTED about 0.2 s later; the guest stays on the source)."""
        return self.call(_("Cancelling the migration"), lambda c: c.lookupByUUIDString(str(uuid)).abortJob())

    def set_max_speed(self, uuid, mib_per_s):
        """Change the bandwidth cap of a running migration (MiB/s; 0 = unlimited)."""
        return self.call(
            _("Changing the bandwidth"),
            lambda c: c.lookupByUUIDString(str(uuid)).migrateSetMaxSpeed(int(mib_per_s), 0),
        )

    def set_max_downtime(self, uuid, ms):
        """Change the tolerated downtime of a running migration (milliseconds)."""
        return self.call(
            _("Changing the maximum downtime"),
            lambda c: c.lookupByUUIDString(str(uuid)).migrateSetMaxDowntime(int(ms), 0),
        )

    def start_postcopy(self, uuid):
        """Switch a running migration (started with POSTCOPY) to post-copy."""
        return self.call(
            _("Switching to post-copy"), lambda c: c.lookupByUUIDString(str(uuid)).migrateStartPostCopy(0)
        )

    def shutdown(self, uuid):
        """Ask the guest to shut down (ACPI); returns at once."""
        return self.call(_("Shutting the VM down"), lambda c: c.lookupByUUIDString(str(uuid)).shutdown())

    def destroy(self, uuid):
        """Force the VM off (like pulling the plug)."""
        return self.call(_("Forcing the VM off"), lambda c: c.lookupByUUIDString(str(uuid)).destroy())

    def start(self, uuid):
        """Start a defined, shut-off VM."""
        return self.call(_("Starting the VM"), lambda c: c.lookupByUUIDString(str(uuid)).create())

    def reboot(self, uuid):
        """Ask the guest to reboot (ACPI, or the guest agent when the hypervisor picks it);
        returns at once. A guest that ignores ACPI simply keeps running."""
        return self.call(_("Rebooting the VM"), lambda c: c.lookupByUUIDString(str(uuid)).reboot(0))

    def define(self, xml):
        """Define (persist) a domain from XML; returns its UUID."""
        return self.call(_("Defining the VM"), lambda c: c.defineXML(xml).UUIDString())

    def undefine(self, uuid):
        """Remove the domain's definition (its disks are left alone)."""
        flags = libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        return self.call(
            _("Removing the VM definition"), lambda c: c.lookupByUUIDString(str(uuid)).undefineFlags(flags)
        )

    def volume_at(self, path):
        """The storage volume at ``path`` as {name, pool, path, capacity, allocation,
        physical, format}, or None when no pool holds a volume there."""

        def read(c):
            try:
                vol = c.storageVolLookupByPath(path)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
                    return None
                raise
            _type, capacity, allocation = vol.info()
            physical = vol.infoFlags(libvirt.VIR_STORAGE_VOL_GET_PHYSICAL)[2]
            xml = ET.fromstring(vol.XMLDesc(0))
            fmt = xml.find("target/format")
            return {
                "name": vol.name(),
                "pool": vol.storagePoolLookupByVolume().name(),
                "path": vol.path(),
                "capacity": capacity,
                "allocation": allocation,
                "physical": physical,
                "format": fmt.get("type", "") if fmt is not None else "",
            }

        return self.call(_("Looking up a disk volume"), read)

    def pool_for_dir(self, directory):
        """Name of the active storage pool whose target path is ``directory``, or None
        (libvirt pre-creates copy-storage target volumes in such a pool)."""

        def read(c):
            try:
                pool = c.storagePoolLookupByTargetPath(directory)
            except libvirt.libvirtError:
                return None
            return pool.name() if pool.isActive() else None

        return self.call(_("Looking up a storage pool"), read)

    def delete_volume(self, path):
        """Delete the volume at ``path`` (used for the source disk after a storage-copy
        migration, only when the user asked, and for half-copied target volumes)."""

        def run(c):
            vol = c.storageVolLookupByPath(path)
            pool = vol.storagePoolLookupByVolume()
            vol.delete(0)
            try:
                pool.refresh(0)
            except libvirt.libvirtError:
                pass

        return self.call(_("Deleting a disk volume"), run)

    def refresh_pool_of(self, directory):
        def run(c):
            try:
                c.storagePoolLookupByTargetPath(directory).refresh(0)
            except libvirt.libvirtError:
                pass

        return self.call(_("Refreshing a storage pool"), run)


def connect(uri, timeout=None, call_timeout=None):
    """Open a connection to ``uri`` within ``timeout`` seconds; returns HostConnection."""
    ensure_event_loop()
    timeout = timeout or settings.LIBVIRT_CONNECT_TIMEOUT
    call_timeout = call_timeout or settings.LIBVIRT_CALL_TIMEOUT

    def open_():
        raw = libvirt.open(uri)
        if not uri.startswith("test:"):
            # Detect a dead peer within ~15 s even while no call is in flight.
            try:
                raw.setKeepAlive(5, 3)
            except libvirt.libvirtError:
                pass
        return raw

    try:
        raw = _bounded(open_, timeout, _("Connecting to %(uri)s") % {"uri": uri})
    except libvirt.libvirtError as exc:
        raise _explain(exc, uri, _("Connecting to %(uri)s") % {"uri": uri}) from None
    return HostConnection(uri, raw, call_timeout)


@contextmanager
def session(uri, **kwargs):
    """``with session(uri) as conn:`` — connect, yield, always close."""
    conn = connect(uri, **kwargs)
    try:
        yield conn
    finally:
        conn.close()


# ------------------------------------------------------------------ parsing helpers

STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}
# Reason codes per state, in libvirt's enum order (the constants of different states
# share numeric values, so they must be mapped per state, never through one dict).
REASON_NAMES = {
    "running": [
        "unknown",
        "booted",
        "migrated",
        "restored",
        "from_snapshot",
        "unpaused",
        "migration_canceled",
        "save_canceled",
        "wakeup",
        "crashed",
        "postcopy",
        "postcopy_failed",
    ],
    "paused": [
        "unknown",
        "user",
        "migration",
        "save",
        "dump",
        "ioerror",
        "watchdog",
        "from_snapshot",
        "shutting_down",
        "snapshot",
        "crashed",
        "starting_up",
        "postcopy",
        "postcopy_failed",
        "api_error",
    ],
    "shutoff": [
        "unknown",
        "shutdown",
        "destroyed",
        "crashed",
        "migrated",
        "saved",
        "failed",
        "from_snapshot",
        "daemon",
    ],
    "shutdown": ["unknown", "user"],
    "crashed": ["unknown", "panicked"],
    "pmsuspended": ["unknown"],
    "blocked": ["unknown"],
    "nostate": ["unknown"],
}


def _state_names(state, reason):
    name = STATE_NAMES.get(state, "nostate")
    reasons = REASON_NAMES.get(name, [])
    return name, reasons[reason] if 0 <= reason < len(reasons) else str(reason)


def _text(node, path, default=""):
    found = node.find(path)
    return found.text.strip() if found is not None and found.text else default


def _read_facts(c):
    caps = ET.fromstring(c.getCapabilities())
    info = c.getInfo()  # [arch, memory MiB, cpus, mhz, nodes, sockets, cores, threads]
    host = caps.find("host")
    try:
        free = c.getFreeMemory()
    except libvirt.libvirtError:
        free = None
    try:
        hostname = c.getHostname()
    except libvirt.libvirtError:
        hostname = ""
    pools = []
    for pool in c.listAllStoragePools():
        try:
            xml = ET.fromstring(pool.XMLDesc(0))
            _state, capacity, allocation, available = pool.info()
            pools.append(
                {
                    "name": pool.name(),
                    "type": xml.get("type", ""),
                    "path": _text(xml, "target/path"),
                    "capacity": capacity,
                    "allocation": allocation,
                    "available": available,
                    "active": bool(pool.isActive()),
                }
            )
        except libvirt.libvirtError:
            continue
    networks = []
    for net in c.listAllNetworks():
        try:
            bridge = net.bridgeName()
        except libvirt.libvirtError:
            bridge = ""
        networks.append({"name": net.name(), "bridge": bridge, "active": bool(net.isActive())})
    return {
        "hostname": hostname,
        "host_uuid": _text(host, "uuid"),
        "arch": _text(host, "cpu/arch") or info[0],
        "cpu_model": _text(host, "cpu/model"),
        "cpu_vendor": _text(host, "cpu/vendor"),
        "cpus": info[2],
        "memory_total": info[1] * 1024 * 1024,
        "memory_free": free,
        "libvirt_version": c.getLibVersion(),
        "hypervisor_version": c.getVersion(),
        "hypervisor_type": c.getType(),
        "migration_transports": [
            t.text for t in host.findall("migration_features/uri_transports/uri_transport")
        ],
        "pools": sorted(pools, key=lambda p: p["name"]),
        "networks": sorted(networks, key=lambda n: n["name"]),
    }


def _read_domains(c):
    records = []
    for dom in c.listAllDomains():
        try:
            records.append(_domain_record(dom))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                continue  # undefined between listing and reading: skip it
            raise
    return records


def _domain_record(dom):
    """Plain-data description of a domain for the inventory (the XML read by hosts.domxml)."""
    guest = parse_guest(dom.XMLDesc(0))
    state, reason = _state_names(*dom.state())
    running = state != "shutoff"
    disks = []
    for disk in guest["disks"]:
        entry = {
            "target": disk["dev"],
            "bus": disk["bus"],
            "device": disk["device"],
            "type": disk["kind_attr"],
            "source": disk["source"],
            "format": disk["format"],
            "cache": disk["driver_cache"],
            "capacity": None,
        }
        if entry["target"] and entry["source"] and entry["device"] == "disk":
            try:
                entry["capacity"] = dom.blockInfo(entry["target"])[0]
            except libvirt.libvirtError:
                pass
        disks.append(entry)
    interfaces = [
        {key: iface[key] for key in ("type", "network", "bridge", "mac", "model")}
        for iface in guest["interfaces"]
    ]
    try:
        snapshots = dom.snapshotNum(0)
    except libvirt.libvirtError:
        snapshots = 0
    try:
        autostart = bool(dom.autostart())
    except libvirt.libvirtError:
        autostart = False
    return {
        "uuid": dom.UUIDString(),
        "name": dom.name(),
        "state": state,
        "state_reason": reason,
        "vcpus": guest["vcpu_current"] if guest["has_vcpu"] else 0,
        "memory": int(dom.maxMemory()) * 1024,
        "persistent": bool(dom.isPersistent()),
        "autostart": autostart,
        "active": running,
        "machine_type": guest["machine"],
        "cpu_mode": guest["cpu_mode_attr"],
        "cpu_model": guest["cpu_model"],
        "disks": disks,
        "interfaces": interfaces,
        "snapshot_count": snapshots,
        "hostdev_count": len(guest["hostdevs"]),
    }


# ------------------------------------------------------------------ migration helpers

JOB_TYPES = {
    libvirt.VIR_DOMAIN_JOB_NONE: "none",
    libvirt.VIR_DOMAIN_JOB_BOUNDED: "bounded",
    libvirt.VIR_DOMAIN_JOB_UNBOUNDED: "unbounded",
    libvirt.VIR_DOMAIN_JOB_COMPLETED: "completed",
    libvirt.VIR_DOMAIN_JOB_FAILED: "failed",
    libvirt.VIR_DOMAIN_JOB_CANCELLED: "cancelled",
}

# libvirt error codes the migration runner tells apart.
ERR_OPERATION_ABORTED = libvirt.VIR_ERR_OPERATION_ABORTED
ERR_NO_DOMAIN = libvirt.VIR_ERR_NO_DOMAIN


def probe_shared(source, target, directories):
    """Prove, per directory, whether ``target`` sees the files ``source`` writes there.

    A file at the same path on both hosts is no proof: it may be a copy left behind by
    an earlier move, with older data. So for each directory a uniquely named empty probe
    volume is created in the source's pool at that directory, the target's pool at the
    same directory is refreshed and asked for it, and the probe is removed again (and the
    target's pool refreshed, so it does not list a vanished file).

    Returns {directory: True (shared) | False (not shared) | None (cannot tell: no active
    pool at that directory on one of the hosts)}. Both connections are HostConnections;
    every libvirt call is bounded by their call timeouts.
    """
    import os.path
    import secrets

    def pool_at(conn, directory):
        def read(c):
            try:
                pool = c.storagePoolLookupByTargetPath(directory)
            except libvirt.libvirtError:
                return None
            return pool if pool.isActive() else None

        return conn.call(_("Looking up a storage pool"), read)

    def probe(directory, src_pool, dst_pool):
        # Named by process too, so a test can tell its own probes from a concurrent run's.
        name = f".kvmweb-probe-{os.getpid()}-{secrets.token_hex(6)}"
        probe_path = os.path.join(directory, name)
        vol_xml = (
            f"<volume><name>{name}</name><capacity unit='bytes'>0</capacity>"
            "<target><format type='raw'/></target></volume>"
        )

        def seen(c):
            dst_pool.refresh(0)
            try:
                c.storageVolLookupByPath(probe_path)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
                    return False
                raise
            return True

        vol = source.call(_("Creating a storage probe"), lambda c: src_pool.createXML(vol_xml, 0))
        try:
            return target.call(_("Looking for the storage probe"), seen)
        finally:
            try:
                source.call(_("Removing the storage probe"), lambda c: vol.delete(0))
                target.call(_("Refreshing a storage pool"), lambda c: dst_pool.refresh(0))
            except HypervisorError:
                pass

    out = {}
    for directory in directories:
        src_pool, dst_pool = pool_at(source, directory), pool_at(target, directory)
        out[directory] = (
            None if src_pool is None or dst_pool is None else probe(directory, src_pool, dst_pool)
        )
    return out


def create_copy_volume(source, target, path):
    """Create the empty volume at ``path`` on ``target`` that a copy of the source's
    volume at the same path will fill (raw, the source's physical size: the bytes are
    copied as stored, and the pool refresh then detects the format). Refuses when the
    target already has a volume there: kvmweb never overwrites a disk. Returns its size."""
    import os.path

    directory, name = os.path.split(path)
    src, dst = source._raw, target._raw
    try:
        total = src.storageVolLookupByPath(path).infoFlags(libvirt.VIR_STORAGE_VOL_GET_PHYSICAL)[2]
        try:
            pool = dst.storagePoolLookupByTargetPath(directory)
        except libvirt.libvirtError:
            raise HypervisorError(
                _("%(uri)s has no storage pool at %(dir)s, so the disk %(path)s cannot be copied there.")
                % {"uri": target.uri, "dir": directory, "path": path},
                remedy=_("Define and start a directory pool at that path on the target host."),
            ) from None
        pool.refresh(0)
        try:
            dst.storageVolLookupByPath(path)
        except libvirt.libvirtError:
            pass
        else:
            raise HypervisorError(
                _("%(uri)s already has a disk at %(path)s; kvmweb will not overwrite it.")
                % {"uri": target.uri, "path": path},
                remedy=_("Remove or rename that volume on the target host first."),
            )
        vol_xml = (
            f"<volume><name>{_xml_escape(name)}</name><capacity unit='bytes'>{total}</capacity>"
            "<allocation unit='bytes'>0</allocation><target><format type='raw'/></target></volume>"
        )
        pool.createXML(vol_xml, 0)
    except libvirt.libvirtError as exc:
        raise _explain(exc, target.uri, _("Preparing the copy of %(path)s") % {"path": path}) from None
    return total


def copy_volume(source, target, path, *, progress=None, should_stop=None, chunk=4 << 20):
    """Copy the volume at ``path`` on ``source`` to the same path on ``target`` through
    libvirt storage-volume streams (virStorageVolDownload / virStorageVolUpload).

    The target volume must exist already (create_copy_volume): creating it is a step of
    its own, so a job's journal knows which volumes it made. ``progress(done, total)`` is
    called after every chunk; ``should_stop()`` returning True aborts the copy. On failure
    the half-written target volume is left for the caller's rollback, which knows whether
    this job created it. Runs for as long as the copy takes: call it from a helper thread.
    Returns the bytes copied.
    """
    src, dst = source._raw, target._raw
    try:
        src_vol = src.storageVolLookupByPath(path)
        total = src_vol.infoFlags(libvirt.VIR_STORAGE_VOL_GET_PHYSICAL)[2]
        dst_vol = dst.storageVolLookupByPath(path)
        pool = dst_vol.storagePoolLookupByVolume()
    except libvirt.libvirtError as exc:
        raise _explain(exc, target.uri, _("Preparing the copy of %(path)s") % {"path": path}) from None
    done = 0
    down = up = None
    try:
        down = src.newStream(0)
        src_vol.download(down, 0, total, 0)
        up = dst.newStream(0)
        dst_vol.upload(up, 0, total, 0)
        while done < total:
            if should_stop is not None and should_stop():
                raise HypervisorError(
                    _("The copy of %(path)s was cancelled.") % {"path": path},
                    code=libvirt.VIR_ERR_OPERATION_ABORTED,
                )
            data = down.recv(min(chunk, total - done))
            if not data:
                break
            view = memoryview(data)
            while view:
                sent = up.send(bytes(view))
                view = view[sent:]
            done += len(data)
            if progress is not None:
                progress(done, total)
        down.finish()
        down = None
        up.finish()
        up = None
        pool.refresh(0)
    except BaseException as exc:
        for stream in (down, up):
            if stream is not None:
                try:
                    stream.abort()
                except libvirt.libvirtError:
                    pass
        if isinstance(exc, libvirt.libvirtError):
            raise _explain(exc, target.uri, _("Copying the disk %(path)s") % {"path": path}) from None
        raise
    return done


def _xml_escape(text):
    from xml.sax.saxutils import escape

    return escape(text, {"'": "&apos;", '"': "&quot;"})
