"""State changes for hosts and the VM inventory. Each writes its audit event in the same
transaction. libvirt is never called inside a transaction: a slow host must not hold the
database write lock, so every service reads from libvirt first, then writes atomically.
"""

import fcntl
import logging
import socket
import threading
from contextlib import contextmanager
from urllib.parse import urlsplit

from django.db import IntegrityError, transaction
from django.utils import timezone
from django.utils.translation import gettext as _

from hosts import busy, hypervisor, reach, transport
from hosts.models import VM, Host, HostGroup, VMLocation
from hosts.uris import DEFAULT_PORTS, InvalidURI, normalize_uri, validate_uri
from kvmweb.audit import record, record_refusal
from kvmweb.audit.models import AuditEvent

log = logging.getLogger(__name__)

VM_FIELDS = [
    "name",
    "state",
    "state_reason",
    "vcpus",
    "memory",
    "persistent",
    "autostart",
    "machine_type",
    "cpu_mode",
    "cpu_model",
    "disks",
    "interfaces",
    "snapshot_count",
    "hostdev_count",
]


class HostError(Exception):
    """A host operation was refused; the message is meant for people."""


def _check_unique(name, uri, exclude_pk=None):
    """Refuse a name or URI that another host has. ``uri`` is in normal form; stored URIs
    are compared in theirs too (rows written before normalisation may be spelled
    differently), so 127.0.0.2 and 0x7f.0.0.2:16509 are one URI."""
    others = Host.objects.exclude(pk=exclude_pk)
    if others.filter(name=name).exists():
        raise HostError(_("A host named %(name)s is already registered.") % {"name": name})
    for other_name, other_uri in others.values_list("name", "uri"):
        if normalize_uri(other_uri) == uri:
            raise HostError(
                _("The URI %(uri)s is already registered, as host %(name)s.")
                % {"uri": uri, "name": other_name}
            )


def host_twin(host_uuid, exclude_pk=None):
    """The registered host with this libvirt host UUID (another spelling of the same
    machine), or None. An empty UUID (libvirt's test driver reports none) matches nothing."""
    if not host_uuid:
        return None
    return Host.objects.exclude(pk=exclude_pk).filter(host_uuid=host_uuid).order_by("pk").first()


def _twin_message(twin, host_uuid):
    return _(
        "This is the libvirt host already registered as %(name)s (host UUID %(uuid)s); "
        "one machine is registered once."
    ) % {"name": twin.name, "uuid": host_uuid}


def _probe_uuid(uri):
    """(host UUID libvirt reports for ``uri``, None) or ("", the HypervisorError) when it
    cannot be read now: an unreachable host is registered anyway, and its first sync
    checks again."""
    try:
        with hypervisor.session(uri) as conn:
            return conn.facts().get("host_uuid") or "", None
    except hypervisor.HypervisorError as exc:
        return "", exc


def _refuse_registration(name, uri, actor, request, message, **details):
    """Audit a refused registration (nothing is created) and raise HostError."""
    with transaction.atomic():
        record(
            "host.register",
            actor=actor,
            request=request,
            target_type="hosts.host",
            target_name=name,
            outcome=AuditEvent.FAILURE,
            details={"uri": uri, "error": message, **details},
        )
    raise HostError(message)


def do_register_host(name, uri, *, actor=None, request=None, group=None, description="", sync=True):
    """Register a host by libvirt URI, then probe it and sync its VMs.

    The host row is created even when the host is unreachable right now (it is shown as
    unreachable with the reason); bad or duplicate names/URIs, and a qemu+tls URI whose
    certificates libvirt rejects (expired, untrusted, missing), are refused with HostError.
    """
    name = (name or "").strip()
    if not name:
        raise HostError(_("Enter a name for the host."))
    try:
        uri = validate_uri(uri)
    except InvalidURI as exc:
        _refuse_registration(name, uri, actor, request, str(exc))
    _check_unique(name, uri)
    # One machine, one host row: two rows for the same libvirtd would each claim its VMs
    # and every sync would move them from one row to the other.
    host_uuid, unreachable = _probe_uuid(uri)
    if isinstance(unreachable, hypervisor.SSHError) and unreachable.problem != "sshd_down":
        # Unknown or changed host key, key not authorised: no silent trust and no retry
        # can fix it, so nothing is registered (an sshd that is down is a host that is down).
        message = f"{unreachable.message} {unreachable.remedy}"
        _refuse_registration(name, uri, actor, request, message, ssh_problem=unreachable.problem)
    if isinstance(unreachable, hypervisor.TLSCertificateError):
        # Not a host that is down for a while: no connection can ever succeed with this
        # certificate, so nothing is registered and the remedy is shown at once.
        message = f"{unreachable.message} {unreachable.remedy}"
        _refuse_registration(name, uri, actor, request, message, tls_problem=unreachable.problem)
    twin = host_twin(host_uuid)
    if twin is not None:
        _refuse_registration(
            name, uri, actor, request, _twin_message(twin, twin.host_uuid), same_as=twin.name
        )
    try:
        with transaction.atomic():
            host = Host.objects.create(name=name, uri=uri, group=group, description=description)
            record(
                "host.register",
                actor=actor,
                request=request,
                target=host,
                details={"uri": uri, "group": str(group or "")},
            )
    except IntegrityError:
        # Lost a race with a concurrent registration of the same name or URI.
        raise HostError(_("That name or URI was registered at the same moment by someone else.")) from None
    if unreachable is not None:
        _store_unreachable(host, unreachable)  # just tried: no second wait for the timeout
    elif sync:
        do_sync_inventory(host, actor=actor, request=request)
    else:
        do_probe_host(host)
    host.refresh_from_db()
    return host


def do_generate_ssh_key(*, actor=None, request=None):
    """Generate kvmweb's SSH key (hosts/transport.py) for qemu+ssh hosts; audited.

    Refused with HostError when a key exists: hosts already trust it, and replacing it
    would lock kvmweb out of all of them."""
    existing = transport.ssh_identity()
    if existing is not None:
        message = _("kvmweb already has an SSH key (%(fp)s); it is never replaced from here.") % {
            "fp": existing.fingerprint
        }
        with transaction.atomic():
            record(
                "host.ssh_key",
                actor=actor,
                request=request,
                target_type="hosts.sshkey",
                target_name=existing.path,
                outcome=AuditEvent.FAILURE,
                details={"error": message, "fingerprint": existing.fingerprint},
            )
        raise HostError(message)
    try:
        identity = transport.generate_ssh_key()
    except FileExistsError:  # another administrator generated it a moment ago
        raise HostError(_("The SSH key was generated at the same moment by someone else.")) from None
    except OSError as exc:
        with transaction.atomic():
            record(
                "host.ssh_key",
                actor=actor,
                request=request,
                target_type="hosts.sshkey",
                target_name=str(transport.ssh_key_path()),
                outcome=AuditEvent.FAILURE,
                details={"error": str(exc)},
            )
        raise HostError(_("Cannot write the SSH key: %(error)s") % {"error": exc.strerror}) from None
    with transaction.atomic():
        record(
            "host.ssh_key",
            actor=actor,
            request=request,
            target_type="hosts.sshkey",
            target_name=identity.path,
            details={"fingerprint": identity.fingerprint, "public_key": identity.public_key},
        )
    return identity


_KEEP_PORTS = object()


def _ports_text(lo, hi):
    return f"{lo}-{hi}" if lo else ""


def do_update_host(
    host,
    *,
    name,
    uri,
    group=None,
    description="",
    migration_port_min=_KEEP_PORTS,
    migration_port_max=_KEEP_PORTS,
    actor=None,
    request=None,
):
    """Change a host's name, URI, group, description or migration port range (audited
    with before/after; the port range is kept when not given)."""
    name = (name or "").strip()
    try:
        uri = validate_uri(uri)
    except InvalidURI as exc:
        raise HostError(str(exc)) from None
    _check_unique(name, uri, exclude_pk=host.pk)
    if migration_port_min is _KEEP_PORTS or migration_port_max is _KEEP_PORTS:
        migration_port_min, migration_port_max = host.migration_port_min, host.migration_port_max
    if (migration_port_min is None) != (migration_port_max is None) or (
        migration_port_min is not None and not 0 < migration_port_min <= migration_port_max <= 65535
    ):
        raise HostError(_("The migration port range must be two ports, the first not above the second."))
    before = {
        "name": host.name,
        "uri": host.uri,
        "group": str(host.group or ""),
        "description": host.description,
        "migration_ports": _ports_text(host.migration_port_min, host.migration_port_max),
    }
    stored = transport.managed_dir(host.uri)  # a certificate kvmweb stored for the old URI
    with transaction.atomic():
        host.name, host.uri, host.group, host.description = name, uri, group, description
        host.migration_port_min, host.migration_port_max = migration_port_min, migration_port_max
        host.save(
            update_fields=["name", "uri", "group", "description", "migration_port_min", "migration_port_max"]
        )
        after = {
            "name": name,
            "uri": uri,
            "group": str(group or ""),
            "description": description,
            "migration_ports": _ports_text(migration_port_min, migration_port_max),
        }
        changes = {k: [before[k], after[k]] for k in before if before[k] != after[k]}
        record("host.change", actor=actor, request=request, target=host, details={"changes": changes})
    # A URI edited away from the stored certificate: its files (key included) go, as on a
    # new upload or the host's removal, unless another host's URI still names them.
    _forget_bundle(stored, keep=transport.managed_dir(uri))
    return host


def do_set_tls_certificate(host, *, ca_pem="", cert_pem="", key_pem="", pkipath="", actor=None, request=None):
    """Give a qemu+tls host its own client certificate: either the uploaded CA,
    certificate and key (checked, then stored by kvmweb under <data dir>/pki/hosts/,
    hosts/transport.py) or a ``pkipath`` directory the administrator manages.  The host's
    URI then names that directory (``pkipath=``), so the next connection uses it.

    Audited as ``host.tls_certificate`` (subject, issuer, expiry, SHA-256 fingerprint and
    the directory; never the key).  A refusal (not a TLS host, a bundle or directory that
    does not pass, a URI that would clash) is audited as a failure and raises HostError
    with the remedy; nothing is written."""

    def refuse(message, remedy=""):
        text = f"{message} {remedy}".strip()
        record_refusal(
            "host.tls_certificate",
            actor=actor,
            request=request,
            obj=host,
            target_type="hosts.host",
            name=host.name,
            reason=text,
        )
        raise HostError(text)

    if transport.scheme(host.uri) != "qemu+tls":
        refuse(
            _("Only qemu+tls hosts use a client certificate; this host's URI is %(uri)s.") % {"uri": host.uri}
        )
    source = "directory" if pkipath else "upload"
    try:
        if pkipath:
            cert = transport.check_pkipath(pkipath)
            directory = pkipath.strip().rstrip("/")
            facts = {
                "subject": cert.subject,
                "issuer": cert.issuer,
                "not_after": cert.not_after.isoformat() if cert.not_after else None,
            }
        else:
            facts = transport.check_bundle(ca_pem, cert_pem, key_pem)
            directory = None
    except transport.CertificateProblem as exc:
        refuse(str(exc), exc.remedy)
    previous = (transport.tls_files(host.uri) or {}).get("cert")
    previous_dir = transport.managed_dir(host.uri)
    written = None  # a directory this call wrote: removed again (key included) on a refusal
    if directory is None:
        directory = str(transport.write_bundle(host.pk, ca_pem, cert_pem, key_pem, facts["fingerprint"]))
        written = directory if directory != str(previous_dir or "") else None
    try:
        uri = validate_uri(transport.with_pkipath(host.uri, directory))
    except InvalidURI as exc:
        transport.remove_bundle(written)
        refuse(str(exc), _("Use a directory path without spaces or quotes."))
    clash = Host.objects.filter(uri=uri).exclude(pk=host.pk).first()
    if clash is not None:
        transport.remove_bundle(written)
        refuse(_("Host %(name)s already uses the URI %(uri)s.") % {"name": clash.name, "uri": uri})
    with transaction.atomic():
        Host.objects.filter(pk=host.pk).update(uri=uri)
        host.uri = uri
        record(
            "host.tls_certificate",
            actor=actor,
            request=request,
            target=host,
            details={
                "source": source,
                "pkipath": directory,
                "previous_certificate": str(previous or ""),
                **facts,
            },
        )
    _forget_bundle(previous_dir, keep=directory)
    return host


def _forget_bundle(directory, keep=None):
    """Delete a certificate directory kvmweb stored once no host's URI names it any more
    (a connection opened before read its files at its handshake)."""
    if directory is None or str(directory) == str(keep or ""):
        return
    if not Host.objects.filter(uri__contains=f"pkipath={directory}").exists():
        transport.remove_bundle(directory)


def do_stage_tls_certificate(*, ca_pem, cert_pem, key_pem, actor=None, request=None):
    """Store a checked CA + client certificate + key for a host not registered yet (the
    Add host wizard's TLS transport): a directory <data dir>/pki/hosts/new-<fp>/ whose path
    the wizard puts in the URI as ``pkipath``.  Audited as ``host.tls_certificate``
    (``staged``); a refusal is audited as a failure and raises HostError."""
    try:
        facts = transport.check_bundle(ca_pem, cert_pem, key_pem)
    except transport.CertificateProblem as exc:
        text = f"{exc} {exc.remedy}".strip()
        record_refusal(
            "host.tls_certificate",
            actor=actor,
            request=request,
            obj=None,
            target_type="hosts.host",
            name=_("(new host)"),
            reason=text,
        )
        raise HostError(text) from None
    directory = transport.write_bundle("new", ca_pem, cert_pem, key_pem, facts["fingerprint"])
    with transaction.atomic():
        record(
            "host.tls_certificate",
            actor=actor,
            request=request,
            target_type="hosts.host",
            target_name=_("(new host)"),
            details={"source": "upload", "staged": True, "pkipath": str(directory), **facts},
        )
    return directory


def do_sweep_staged_certificates(max_age=24 * 3600):
    """Delete the certificate bundles the Add host wizard stored for a host that was never
    registered (``new-*``, key included) once they are ``max_age`` seconds old and no
    host's URI names them, and the leftovers of a write that crashed.  Each removal is
    audited as ``host.tls_certificate`` (``removed``).  Returns the removed paths.

    A day leaves an administrator who uploaded a bundle and stepped away time to finish
    the wizard; the inventory schedule calls this, so nobody has to remember."""
    removed = []
    for directory in transport.staged_bundles(max_age):
        if Host.objects.filter(uri__contains=f"pkipath={directory}").exists():
            continue  # registered with the staged path: the host owns it now
        transport.remove_bundle(directory)
        removed.append(str(directory))
        if directory.name.startswith("new-"):
            record(
                "host.tls_certificate",
                target_type="hosts.host",
                target_name=_("(new host)"),
                details={"staged": True, "removed": True, "pkipath": str(directory)},
            )
    return removed


def do_remove_host(host, *, actor=None, request=None):
    """Forget a host. Its VMs keep their rows (and history) and are marked gone."""
    with transaction.atomic():
        vm_count = VM.objects.filter(host=host, gone=False).update(gone=True)
        record(
            "host.remove",
            actor=actor,
            request=request,
            target=host,
            details={"uri": host.uri, "vms_marked_gone": vm_count},
        )
        stored = transport.managed_dir(host.uri)
        host.delete()
    _forget_bundle(stored)  # the certificate kvmweb stored for it, key included


def do_set_maintenance(host, on, *, reason="", actor=None, request=None):
    """Put ``host`` in maintenance (``on``) or take it out, with who, when and why.

    Idempotent: switching to the state the host is already in changes nothing but is
    still audited (the reason may be new). The conditional UPDATE keeps two people
    toggling at once from writing a "since" that belongs to the other's switch."""
    reason = (reason or "").strip()[:500]
    who = actor.get_username() if actor is not None and actor.is_authenticated else ""
    with transaction.atomic():
        was = Host.objects.filter(pk=host.pk).values_list("maintenance", flat=True).first()
        if was is None:
            raise HostError(_("This host is not registered any more."))
        fields = {"maintenance": bool(on), "maintenance_reason": reason if on else ""}
        if bool(on) != was:
            fields.update(maintenance_by=who if on else "", maintenance_since=timezone.now() if on else None)
        Host.objects.filter(pk=host.pk).update(**fields)
        host.refresh_from_db()
        record(
            "host.maintenance",
            actor=actor,
            request=request,
            target=host,
            details={"maintenance": bool(on), "was": was, "reason": reason},
        )
    return host


def do_probe_host(host, *, actor=None, request=None):
    """Probe a host and store its facts, or mark it unreachable with the reason."""
    try:
        with hypervisor.session(host.uri) as conn:
            facts = conn.facts()
    except hypervisor.HypervisorError as exc:
        _store_unreachable(host, exc)
        return False
    twin = host_twin(facts.get("host_uuid"), exclude_pk=host.pk)
    if twin is not None:
        _store_unreachable(host, hypervisor.HypervisorError(_twin_message(twin, facts["host_uuid"])))
        return False
    _store_facts(host, facts)
    return True


def _store_unreachable(host, exc):
    now = timezone.now()
    message = exc.message + (f" {exc.remedy}" if exc.remedy else "")
    with transaction.atomic():
        host = Host.objects.select_for_update().get(pk=host.pk)
        was = host.status
        host.mark_unreachable(message, now)
        host.save(update_fields=["status", "last_error", "last_probe_at"])
        if was != Host.UNREACHABLE:
            record(
                "host.status",
                target=host,
                outcome=AuditEvent.FAILURE,
                details={"from": was, "to": host.status, "error": message},
            )


def _store_facts(host, facts):
    now = timezone.now()
    with transaction.atomic():
        host = Host.objects.select_for_update().get(pk=host.pk)
        was = host.status
        host.apply_facts(facts, now)
        host.save()
        if was != Host.REACHABLE:
            record("host.status", target=host, details={"from": was, "to": host.status})
    return host


def do_sync_inventory(host, *, actor=None, request=None):
    """Probe the host and reconcile its VMs with the inventory, by UUID.

    Returns a summary dict (added, moved, gone, updated, error). When the host cannot be
    reached nothing about its VMs is changed: we do not know where they are.
    """
    listed_at = timezone.now()
    try:
        with hypervisor.session(host.uri) as conn:
            facts = conn.facts()
            records = conn.domains()
        twin = host_twin(facts.get("host_uuid"), exclude_pk=host.pk)
        if twin is not None:
            # Registered before its UUID could be read, or its URI was edited: never
            # apply its listing, which would move the twin's VMs onto this row.
            raise hypervisor.HypervisorError(_twin_message(twin, facts["host_uuid"]))
    except hypervisor.HypervisorError as exc:
        _store_unreachable(host, exc)
        if actor is not None:
            with transaction.atomic():
                record(
                    "inventory.sync",
                    actor=actor,
                    request=request,
                    target=host,
                    outcome=AuditEvent.FAILURE,
                    details={"error": exc.message},
                )
        return {"added": [], "moved": [], "gone": [], "updated": 0, "error": exc.message}
    host = _store_facts(host, facts)
    return apply_inventory(host, records, actor=actor, request=request, listed_at=listed_at)


def apply_inventory(host, records, *, actor=None, request=None, via="sync", listed_at=None, partial=False):
    """Reconcile the VM rows with the domains found on ``host`` (one transaction).

    A listing is a snapshot that may be stale by the time it is applied. Two races matter:
    during a migration the domain exists on both hosts, and a listing read before a
    migration finished may be applied after the migration moved the row. So a sync
    (``via="sync"``) never moves or buries a VM that has an active migration job, nor one
    whose last recorded move is newer than ``listed_at``; the migration runner
    (``via="migration"``) owns those rows until the job ends.
    ``partial``: ``records`` are some of the host's domains (the VM a migration just
    moved), not a listing: nothing absent from them is marked gone.
    """
    now = timezone.now()
    by_uuid = {r["uuid"]: r for r in records}
    summary = {"added": [], "moved": [], "gone": [], "updated": 0, "error": ""}
    with transaction.atomic():
        existing = {
            str(vm.uuid): vm
            for vm in VM.objects.select_for_update(of=("self",))
            .filter(uuid__in=list(by_uuid))
            .select_related("host")
        }
        held = set()
        if via != "migration":
            candidates = [vm.pk for vm in existing.values()]
            active = busy.active_jobs()
            held = set(active.filter(vm__host=host).values_list("vm_id", flat=True))
            held |= set(active.filter(vm_id__in=candidates).values_list("vm_id", flat=True))
            if listed_at is not None:
                newer = VMLocation.objects.filter(vm_id__in=candidates, at__gt=listed_at)
                held |= set(newer.values_list("vm_id", flat=True))
        to_create, to_update, locations = [], [], []
        for uuid, rec in by_uuid.items():
            vm = existing.get(uuid)
            if vm is None:
                vm = VM(uuid=uuid, host=host, last_seen_at=now)
                _copy(vm, rec)
                to_create.append(vm)
                locations.append((vm, "new"))
                summary["added"].append(rec["name"])
                continue
            if vm.host_id != host.pk:
                if vm.pk in held:
                    continue  # a migration owns this row now, or moved it after this listing
                if not rec["active"] and vm.host_id and not vm.gone and vm.is_running:
                    # A shut-off copy of a VM that runs elsewhere: a stale definition left
                    # by a migration without undefine-source. Do not move the row; flag it.
                    if host.name not in vm.stale_hosts:
                        vm.stale_hosts = sorted(vm.stale_hosts + [host.name])
                        to_update.append(vm)
                    continue
                summary["moved"].append(rec["name"])
                locations.append((vm, f"from {vm.host.name if vm.host else 'unknown'}"))
                vm.host = host
            elif host.name in vm.stale_hosts:
                vm.stale_hosts = [h for h in vm.stale_hosts if h != host.name]
            elif not vm.gone and all(getattr(vm, f) == rec[f] for f in VM_FIELDS):
                continue  # unchanged: only last_seen_at moves (one UPDATE for all below)
            _copy(vm, rec)
            vm.gone = False
            to_update.append(vm)
        VM.objects.bulk_create(to_create)
        changed = VM_FIELDS + ["host", "gone", "stale_hosts"]
        if len(to_update) == 1:
            # One changed row (the VM a migration just moved, among others): a plain
            # UPDATE. Django builds bulk_update's CASE expressions per field even for one
            # row, and a migration's write sits between its end and the job's final state.
            to_update[0].save(update_fields=changed)
        elif to_update:
            # bulk_update writes CASE expressions per field: keep it to the rows that changed.
            VM.objects.bulk_update(to_update, changed, batch_size=200)
        summary["updated"] = len(to_update)
        VM.objects.filter(host=host, uuid__in=list(by_uuid)).update(last_seen_at=now)
        # Stale copies that vanished from this host (a partial read cannot tell).
        vanished = VM.objects.none() if partial else VM.objects.exclude(stale_hosts=[])
        for vm in vanished.exclude(uuid__in=list(by_uuid)):
            if host.name in vm.stale_hosts:
                vm.stale_hosts = [h for h in vm.stale_hosts if h != host.name]
                vm.save(update_fields=["stale_hosts"])
        missing = (
            VM.objects.filter(host=host, gone=False).exclude(uuid__in=list(by_uuid)).exclude(pk__in=held)
        )
        if partial:
            missing = missing.none()
        summary["gone"] = list(missing.values_list("name", flat=True))
        missing.update(gone=True)
        VMLocation.objects.bulk_create(
            VMLocation(vm=vm, host=host, host_name=host.name, at=now, via=via, note=note)
            for vm, note in locations
        )
        if not partial:
            Host.objects.filter(pk=host.pk).update(last_sync_at=now)
        if summary["added"] or summary["moved"] or summary["gone"]:
            record(
                "inventory.sync",
                actor=actor,
                request=request,
                target=host,
                details={k: summary[k][:200] for k in ("added", "moved", "gone")},
            )
    return summary


def _copy(vm, rec):
    for field in VM_FIELDS:
        setattr(vm, field, rec[field])


def do_sync_all():
    """Sync every registered host (the periodic schedule calls this)."""
    results = {}
    for host in Host.objects.all():
        try:
            results[host.name] = do_sync_inventory(host)
        except Exception as exc:  # one broken host must not stop the others
            log.exception("inventory sync of %s failed", host.name)
            results[host.name] = {"error": str(exc)}
    return results


def refresh_vm_state(vm, timeout=3):
    """Read ``vm``'s power state from its host now and store it when it changed.

    Plans depend on it (the modes that fit, whether a cold move starts the VM on the
    target), and the stored inventory may be minutes old: a VM started outside kvmweb
    must not be moved and left off. Bounded by ``timeout``; when the host does not
    answer the stored state stays (the preflight then reports the host)."""
    if vm.host is None or vm.gone:
        return vm
    try:
        with hypervisor.session(vm.host.uri, timeout=timeout, call_timeout=timeout) as conn:
            found = conn.find_domain(vm.uuid)
    except hypervisor.HypervisorError:
        return vm
    if found is not None and (vm.state, vm.state_reason) != found:
        vm.state, vm.state_reason = found
        VM.objects.filter(pk=vm.pk).update(state=vm.state, state_reason=vm.state_reason)
    return vm


# ------------------------------------------------------------------ power actions


class PowerError(HostError):
    """A power action was refused or failed; the message is meant for people."""


class PowerDenied(PowerError):
    """The user may not change this VM's power state (audited as denied)."""


# action -> (HostConnection method, states the VM must be in according to libvirt).
# libvirt is asked for the state first: the inventory may be minutes old.
POWER_ACTIONS = {
    "start": ("start", {"shutoff", "crashed"}),
    "shutdown": ("shutdown", {"running", "paused", "blocked"}),
    "destroy": ("destroy", {"running", "paused", "blocked", "shutdown", "crashed", "pmsuspended"}),
    "reboot": ("reboot", {"running", "blocked"}),
}


def power_action_label(action):
    labels = {
        "start": _("start"),
        "shutdown": _("shut down"),
        "destroy": _("force off"),
        "reboot": _("reboot"),
    }
    return labels.get(action, action)


def _power_call(uri, uuid, action):
    """Run one power action on the host; returns (state before, state after) as names.

    Each libvirt call is bounded by the call timeout (hypervisor.session). shutdown and
    reboot only ask the guest (ACPI) and return at once, so "after" may still be running.
    """
    method, allowed = POWER_ACTIONS[action]
    with hypervisor.session(uri) as conn:
        before, _reason = conn.domain_state(uuid)
        if before not in allowed:
            raise PowerError(
                _("Cannot %(action)s the VM: libvirt reports it as %(state)s.")
                % {"action": power_action_label(action), "state": _state_label(before)}
            )
        getattr(conn, method)(uuid)
        after, _reason = conn.domain_state(uuid)
    return before, after


def _state_label(state):
    return str(dict(VM.STATES).get(state, state))


def check_vm_power(user, vm, action):
    """Raise PowerError when ``user`` may not run ``action`` on ``vm`` now, else return.

    Scope and capability: the VM must be in the user's scope (VM.objects.restrict) and the
    user must hold hosts.power_vm (operators, administrators, and self-service owners for
    their own VMs). A VM with a migration job that is queued or running is refused: a power
    change in the middle of a move could leave the guest half on each host. A request still
    waiting for approval does not block: its preflight runs again when it is approved.
    """
    if action not in POWER_ACTIONS:
        raise PowerError(_("Unknown power action."))
    if (
        not user.has_perm("hosts.power_vm")
        or not VM.objects.restrict(user, "power").filter(pk=vm.pk).exists()
    ):
        raise PowerDenied(_("You may not change the power state of this VM."))
    if vm.gone or vm.host_id is None:
        raise PowerError(_("This VM is gone: it is not on any registered host."))
    job = busy.active_jobs(waiting=False).filter(vm=vm).values_list("pk", flat=True).first()
    if job:
        raise PowerError(
            _("Migration job #%(job)s is under way for this VM: wait for it to end or cancel it first.")
            % {"job": job}
        )


def do_vm_power(user, vm, action, *, request=None):
    """Start, shut down (ACPI), force off (destroy) or reboot a VM, audited.

    Checks (check_vm_power), calls libvirt outside any transaction (a slow host must not
    hold the database write lock), then stores the state libvirt reports and writes the
    audit event in one transaction. Refusals and libvirt failures are audited (denied or
    failure) and raised as PowerError. Returns the VM with its new state.

    The job check and the libvirt call are not atomic: a migration queued in between
    finds the new state in its own preflight, which runs on the worker just before it moves
    the VM, so a stale state cannot start a wrong move.
    """
    host = vm.host
    details = {"action": action, "host": host.name if host else ""}
    try:
        check_vm_power(user, vm, action)
        before, after = _power_call(host.uri, vm.uuid, action)
    except (PowerError, hypervisor.HypervisorError) as exc:
        message = str(exc) if isinstance(exc, PowerError) else exc.message
        with transaction.atomic():
            record(
                "vm.power",
                actor=user,
                request=request,
                target=vm,
                outcome=AuditEvent.DENIED if isinstance(exc, PowerDenied) else AuditEvent.FAILURE,
                details=dict(details, error=message),
            )
        raise (PowerDenied if isinstance(exc, PowerDenied) else PowerError)(message) from None
    now = timezone.now()
    with transaction.atomic():
        VM.objects.filter(pk=vm.pk).update(state=after, last_seen_at=now)
        vm.state, vm.last_seen_at = after, now
        record(
            "vm.power",
            actor=user,
            request=request,
            target=vm,
            details=dict(details, state_before=before, state_after=after),
        )
    return vm


def busy_vm_ids(vms):
    """Primary keys among ``vms`` that have a migration job queued or running (one query):
    the lists hide power actions and the Migrate link for those."""
    ids = [vm.pk for vm in vms]
    if not ids:
        return set()
    active = busy.active_jobs(waiting=False)
    return set(active.filter(vm_id__in=ids).values_list("vm_id", flat=True))


# --- VM ownership (moved from kvmweb/accounts/services.py) ---------------------------

KEEP = object()  # do_set_owner: leave that part of the owner as it is


def _owner_text(vm):
    return {
        "user": vm.owner_user.get_username() if vm.owner_user_id else None,
        "group": vm.owner_group.name if vm.owner_group_id else None,
    }


def do_set_owner(vms, *, owner_user=KEEP, owner_group=KEEP, actor, request=None):
    """Set the owning user and/or group of each VM in ``vms``; KEEP leaves that part as
    it is, None clears it. One audit event per VM that actually changes (before/after),
    all in one transaction. Returns the number of VMs changed.

    Ownership lives on the VM row, which follows the domain's UUID across hosts, so it
    survives moves made by kvmweb or by hand.
    """
    changed = 0
    with transaction.atomic():
        # FOR UPDATE (a no-op on SQLite, whose IMMEDIATE transactions already serialize
        # writers): two administrators editing the same VM each audit a true "before".
        rows = (
            VM.objects.select_for_update(of=("self",))  # not the nullable owner joins
            .select_related("owner_user", "owner_group")
            .filter(pk__in=[vm.pk for vm in vms])
            .order_by("pk")
        )
        for vm in rows:
            before = _owner_text(vm)
            if owner_user is not KEEP:
                vm.owner_user = owner_user
            if owner_group is not KEEP:
                vm.owner_group = owner_group
            after = _owner_text(vm)
            if after == before:
                continue
            vm.save(update_fields=["owner_user", "owner_group"])
            record(
                "vm.owner",
                actor=actor,
                request=request,
                target=vm,
                details={"before": before, "after": after},
            )
            changed += 1
    return changed


# --- Host groups (moved from kvmweb/accounts/services.py) ------------------------------


class HostGroupError(Exception):
    """A host group change refused (the message is safe to show)."""


def do_save_host_group(group, *, name, description="", hosts=(), actor, request=None):
    """Create (group=None) or change a host group and set which hosts belong to it.

    Hosts moved into the group leave their previous group; hosts left out of the list
    that were in it end up in no group. Audited with the membership change.
    """
    name = (name or "").strip()
    action = "hostgroup.create" if group is None else "hostgroup.change"
    if not name:
        raise HostGroupError(_("Enter a name for the host group."))
    if HostGroup.objects.filter(name=name).exclude(pk=getattr(group, "pk", None)).exists():
        record_refusal(
            action,
            actor=actor,
            request=request,
            obj=group,
            target_type="hosts.hostgroup",
            name=name,
            reason="name taken",
        )
        raise HostGroupError(_("A host group named %(name)s exists already.") % {"name": name})
    with transaction.atomic():
        created = group is None
        before = {} if created else {"name": group.name, "description": group.description}
        if created:
            group = HostGroup.objects.create(name=name, description=description)
            old_members = set()
        else:
            old_members = set(group.hosts.values_list("pk", flat=True))
            group.name, group.description = name, description
            group.save(update_fields=["name", "description"])
        new_members = {h.pk for h in hosts}
        Host.objects.filter(pk__in=new_members - old_members).update(group=group)
        Host.objects.filter(pk__in=old_members - new_members).update(group=None)
        names = dict(Host.objects.filter(pk__in=new_members | old_members).values_list("pk", "name"))
        record(
            action,
            actor=actor,
            request=request,
            target=group,
            details={
                "before": before,
                "after": {"name": name, "description": description},
                "hosts_added": sorted(names[pk] for pk in new_members - old_members),
                "hosts_removed": sorted(names[pk] for pk in old_members - new_members),
            },
        )
    return group


def do_delete_host_group(group, *, actor, request=None):
    """Delete a host group; its hosts stay, without a group, and its policy goes."""
    with transaction.atomic():
        record(
            "hostgroup.delete",
            actor=actor,
            request=request,
            target=group,
            details={"hosts": sorted(group.hosts.values_list("name", flat=True))},
        )
        group.delete()


# ------------------------------------------------------------------ SSH host keys


@contextmanager
def _known_hosts_lock():
    """Serialise writers of kvmweb's known_hosts across processes (web, workers)."""
    path = transport.known_hosts_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _ssh_target_or_error(uri, action, actor, request):
    """The SSHTarget of ``uri``, or HostError (audited as a failed host-key action)."""
    try:
        target = transport.ssh_target(validate_uri(uri))
        message = (
            "" if target else _("Host keys apply to SSH URIs only (qemu+ssh, qemu+libssh2, qemu+libssh).")
        )
    except InvalidURI as exc:
        message = str(exc)
    if message:
        with transaction.atomic():
            record(
                "host.ssh_hostkey",
                actor=actor,
                request=request,
                target_type="hosts.sshhostkey",
                target_name=(uri or "")[:200],
                outcome=AuditEvent.FAILURE,
                details={"action": action, "error": message},
            )
        raise HostError(message)
    return target


def _host_key_event(target, action, actor, request, outcome=AuditEvent.SUCCESS, **details):
    record(
        "host.ssh_hostkey",
        actor=actor,
        request=request,
        target_type="hosts.sshhostkey",
        target_name=target.token,
        outcome=outcome,
        details={"action": action, **details},
    )


def do_confirm_host_key(uri, fingerprint, *, actor=None, request=None, replace=False):
    """Store the host key of an SSH URI's host in kvmweb's known_hosts, after an
    administrator compared ``fingerprint`` (what the page showed) with the host.

    The key is scanned again and must still have that fingerprint (the page may be old,
    or someone may sit in the middle since).  A host whose stored key differs is refused
    unless ``replace`` (the audited "replace host key" action).  Returns the stored
    HostKeys.  Audited as ``host.ssh_hostkey`` (action confirm / replace), failures too."""
    action = "replace" if replace else "confirm"
    target = _ssh_target_or_error(uri, action, actor, request)
    path = target.known_hosts or transport.known_hosts_path()

    def refuse(message, **details):
        with transaction.atomic():
            _host_key_event(target, action, actor, request, AuditEvent.FAILURE, error=message, **details)
        raise HostError(message)

    if str(path) != str(transport.known_hosts_path()):
        refuse(
            _("This URI names another known_hosts file (%(path)s); kvmweb only writes its own (%(own)s).")
            % {"path": path, "own": transport.known_hosts_path()}
        )
    try:
        scanned = transport.scan_host_keys(target.address, target.port)
    except transport.KeyScanError as exc:
        refuse(_("Cannot read the host key of %(host)s: %(error)s") % {"host": target.token, "error": exc})
    chosen = [k for k in scanned if k.fingerprint == fingerprint]
    if not chosen:
        refuse(
            _(
                "The host %(host)s does not present the key %(fp)s any more (it presents %(now)s); nothing stored."
            )
            % {"host": target.token, "fp": fingerprint, "now": ", ".join(k.fingerprint for k in scanned)},
            presented=[k.fingerprint for k in scanned],
        )
    with _known_hosts_lock():
        stored = transport.stored_host_keys(target)
        state = transport.compare_host_keys(stored, scanned)
        if state == transport.CHANGED and not replace:
            refuse(
                _(
                    'kvmweb holds another host key for %(host)s (%(old)s); use "Replace host key" '
                    "if the change is expected."
                )
                % {"host": target.token, "old": ", ".join(k.fingerprint for k in stored)},
                stored=[k.fingerprint for k in stored],
            )
        # Every key the host presents whose type we confirmed: the fingerprint shown is the
        # one the administrator compared; the host's other key types are not trusted.
        transport.write_host_keys(target, chosen)
        with transaction.atomic():
            _host_key_event(
                target,
                action,
                actor,
                request,
                fingerprint=fingerprint,
                keytype=chosen[0].keytype,
                previous=[k.fingerprint for k in stored],
            )
    return chosen


def host_key_state(uri):
    """(state, stored HostKeys, scanned HostKeys or [], error text) for an SSH URI:
    state is transport.UNKNOWN / MATCHES / CHANGED, or "" when the key cannot be read."""
    target = transport.ssh_target(uri)
    stored = transport.stored_host_keys(target, target.known_hosts or None)
    try:
        scanned = transport.scan_host_keys(target.address, target.port)
    except transport.KeyScanError as exc:
        return "", stored, [], str(exc)
    return transport.compare_host_keys(stored, scanned), stored, scanned, ""


def changed_host_key(host, user):
    """For an administrator looking at an SSH host whose last error is a changed host
    key: {"stored": [fingerprints], "presented": [HostKey]} to offer "Replace host key";
    else None.  Scans only in that case (ssh-keyscan, bounded by KEYSCAN_TIMEOUT)."""
    if not user.has_perm("hosts.change_host") or transport.ssh_target(host.uri) is None:
        return None
    # libvirt's own words are kept in the stored error (hypervisor._explain_ssh).
    if host.status != Host.UNREACHABLE or "differs from stored identity" not in (host.last_error or ""):
        return None
    state, stored, scanned, _error = host_key_state(host.uri)
    if state != transport.CHANGED:
        return None
    return {"stored": [k.fingerprint for k in stored], "presented": scanned}


# ------------------------------------------------------------------ "Test connection"

PASS, FAIL, CONFIRM, SKIP = "pass", "fail", "confirm", "skip"


def _step(sid, label, status, message="", remedy="", **details):
    return {
        "id": sid,
        "label": label,
        "status": status,
        "message": message,
        "remedy": remedy,
        "details": details,
    }


def _resolve(address, timeout):
    """getaddrinfo bounded by ``timeout`` (it has no timeout of its own)."""
    box = {}

    def run():
        try:
            box["value"] = socket.getaddrinfo(address, None, type=socket.SOCK_STREAM)
        except OSError as exc:
            box["error"] = exc

    worker = threading.Thread(target=run, daemon=True, name=f"resolve {address}")
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise OSError(_("no answer from the resolver within %(s)s s") % {"s": timeout})
    if "error" in box:
        raise box["error"]
    return sorted({info[4][0] for info in box["value"]})


def _ssh_login(target, timeout):
    """Log in with kvmweb's key and the confirmed host key only (the ssh binary in batch
    mode: no prompt, no agent, no user config).  Returns (ok, last line of stderr)."""
    import subprocess

    cmd = reach.ssh_command(target, ["true"], timeout)
    try:
        run = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout + 5, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        return False, _("no answer within %(s)s s") % {"s": timeout}
    lines = [ln for ln in run.stderr.strip().splitlines() if ln and not ln.startswith("Warning")]
    return run.returncode == 0, (lines or [""])[-1]


def check_connection(uri, timeout=5):
    """Diagnose a URI step by step for the add-host wizard, changing nothing.

    Returns a list of steps {id, label, status, message, remedy, details}; status is
    "pass", "fail", "confirm" (an SSH host key an administrator must confirm first) or
    "skip" (an earlier step failed).  Steps: URI, name resolution, TCP, then for SSH the
    host key and the login with kvmweb's key, for TLS the client certificate, and last
    libvirt itself (socket permission, polkit), opened through hosts/hypervisor.py with
    a timeout."""
    steps = []
    try:
        uri = validate_uri(uri)
    except InvalidURI as exc:
        return [_step("uri", _("URI"), FAIL, str(exc), _("Correct the address, user or port."))]
    steps.append(_step("uri", _("URI"), PASS, uri))
    parts = urlsplit(uri)
    sch = transport.scheme(uri)
    blocked = False
    if parts.hostname:
        address = parts.hostname.strip("[]")
        port = parts.port or DEFAULT_PORTS.get(sch)
        try:
            found = _resolve(address, timeout)
            steps.append(_step("resolve", _("Name resolution"), PASS, ", ".join(found)))
        except OSError as exc:
            blocked = True
            steps.append(
                _step(
                    "resolve",
                    _("Name resolution"),
                    FAIL,
                    _("%(host)s does not resolve: %(error)s")
                    % {"host": address, "error": exc.strerror or exc},
                    _("Use a name the kvmweb machine resolves (DNS or /etc/hosts), or the IP address."),
                )
            )
        if not blocked:
            try:
                socket.create_connection((address, port), timeout=timeout).close()
                steps.append(_step("tcp", _("TCP connection"), PASS, f"{address}:{port}"))
            except OSError as exc:
                blocked = True
                service = "sshd" if sch in transport.SSH_SCHEMES else "libvirtd"  # program names
                steps.append(
                    _step(
                        "tcp",
                        _("TCP connection"),
                        FAIL,
                        _("Cannot connect to %(addr)s:%(port)s: %(error)s")
                        % {"addr": address, "port": port, "error": exc.strerror or exc},
                        _(
                            "Check that %(service)s runs on the host and listens on port %(port)s, and that "
                            "no firewall between kvmweb and the host blocks it."
                        )
                        % {"service": service, "port": port},
                    )
                )
    if sch in transport.SSH_SCHEMES and not blocked:
        blocked = _ssh_steps(uri, steps, timeout)
    if sch == "qemu+tls" and not blocked:
        cert = transport.client_certificate(uri)
        status = FAIL if cert.status not in (transport.OK, transport.EXPIRING) else PASS
        blocked = status == FAIL
        steps.append(
            _step("tls", _("TLS client certificate"), status, cert.message, cert.remedy, path=cert.path)
        )
    if blocked:
        steps.append(_step("libvirt", _("libvirt"), SKIP, _("Not tried: an earlier step failed.")))
        return steps
    try:
        with hypervisor.session(uri, timeout=timeout) as conn:
            facts = conn.facts()
        steps.append(
            _step(
                "libvirt",
                _("libvirt"),
                PASS,
                _("Connected to %(host)s (libvirt %(version)s).")
                % {"host": facts.get("hostname") or uri, "version": _version(facts.get("libvirt_version"))},
            )
        )
    except hypervisor.HypervisorError as exc:
        lowered = exc.message.lower()
        remedy = exc.remedy
        if "polkit" in lowered or "authentication unavailable" in lowered or "permission denied" in lowered:
            remedy = _(
                "The login works but libvirt refuses the user: add the URI's user to the libvirt group "
                "(usermod -aG libvirt USER), or allow it in polkit (org.libvirt.unix.manage), or log in as root."
            )
        steps.append(_step("libvirt", _("libvirt"), FAIL, exc.message, remedy))
    return steps


def _version(number):
    """libvirt's version integer (9000000) as text (9.0.0)."""
    if not isinstance(number, int):
        return "?"
    return f"{number // 1000000}.{number // 1000 % 1000}.{number % 1000}"


def connection_ready(steps):
    """True when every step of check_connection passed: the wizard then offers to
    register the host (a skipped or confirm step means something is still missing)."""
    return bool(steps) and all(step["status"] == PASS for step in steps)


def _ssh_steps(uri, steps, timeout):
    """The host-key and login steps of check_connection; True when they block."""
    target = transport.ssh_target(uri)
    state, stored, scanned, error = host_key_state(uri)
    if error:
        steps.append(
            _step(
                "host_key",
                _("SSH host key"),
                FAIL,
                _("No SSH host key received: %(error)s") % {"error": error},
                _("Check that the port is the host's sshd."),
            )
        )
        return True
    fingerprints = [{"type": k.keytype, "fingerprint": k.fingerprint} for k in scanned]
    if state == transport.UNKNOWN:
        steps.append(
            _step(
                "host_key",
                _("SSH host key"),
                CONFIRM,
                _("First connection to %(host)s: compare the fingerprint with the host before confirming it.")
                % {"host": target.token},
                _("On the host: ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub"),
                presented=fingerprints,
            )
        )
        return True
    if state == transport.CHANGED:
        steps.append(
            _step(
                "host_key",
                _("SSH host key"),
                FAIL,
                _("The host key of %(host)s CHANGED: kvmweb holds %(old)s, the host presents %(new)s.")
                % {
                    "host": target.token,
                    "old": ", ".join(k.fingerprint for k in stored),
                    "new": ", ".join(k.fingerprint for k in scanned),
                },
                _(
                    "Check on the host console whether its keys were regenerated; if so, replace the key "
                    "(audited). Otherwise someone may be in the middle: do not connect."
                ),
                presented=fingerprints,
                stored=[k.fingerprint for k in stored],
            )
        )
        return True
    steps.append(
        _step(
            "host_key",
            _("SSH host key"),
            PASS,
            ", ".join(k.fingerprint for k in stored),
            presented=fingerprints,
        )
    )
    ok, said = _ssh_login(target, timeout)
    if ok:
        steps.append(
            _step("ssh_auth", _("SSH login"), PASS, _("Logged in as %(user)s.") % {"user": target.user})
        )
        return False
    identity = transport.ssh_identity()
    steps.append(
        _step(
            "ssh_auth",
            _("SSH login"),
            FAIL,
            _("The host refused kvmweb's key for %(user)s: %(said)s")
            % {"user": target.user or "?", "said": said},
            _("Append kvmweb's public key %(fp)s (Hosts page) to ~%(user)s/.ssh/authorized_keys on the host.")
            % {"fp": identity.fingerprint if identity else _("(generate it first)"), "user": target.user},
        )
    )
    return True
