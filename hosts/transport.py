"""What a host's URI means for transport security: TLS client certificates and
which connection a peer-to-peer migration uses.  Reads files only (never libvirt).

libvirt's TLS client reads three files: ``cacert.pem`` (the CA that signed the
server's certificate), ``clientcert.pem`` and ``clientkey.pem``.  With ``?pkipath=DIR``
in the URI they are all in DIR; otherwise root uses /etc/pki/CA/cacert.pem,
/etc/pki/libvirt/clientcert.pem and /etc/pki/libvirt/private/clientkey.pem, and other
users ``~/.pki/libvirt/``.  libvirt refuses to connect when its own client certificate
has expired, so an expiry that passes unnoticed takes the host away at that moment;
kvmweb shows the date and warns ``TLS_EXPIRY_WARN_DAYS`` (30) days ahead.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from django.conf import settings
from django.utils import timezone
from django.utils.translation import gettext as _

OK, EXPIRING, EXPIRED, MISSING, UNREADABLE = "ok", "expiring", "expired", "missing", "unreadable"


def warn_days():
    return int(getattr(settings, "TLS_EXPIRY_WARN_DAYS", 30))


def scheme(uri):
    return urlsplit(uri or "").scheme.lower()


def tls_files(uri):
    """{"ca": Path, "cert": Path, "key": Path} libvirt reads for a qemu+tls URI, else None."""
    if scheme(uri) != "qemu+tls":
        return None
    pkipath = (parse_qs(urlsplit(uri).query).get("pkipath") or [""])[0]
    if pkipath:
        base = Path(pkipath)
        return {"ca": base / "cacert.pem", "cert": base / "clientcert.pem", "key": base / "clientkey.pem"}
    if os.geteuid() == 0:
        return {
            "ca": Path("/etc/pki/CA/cacert.pem"),
            "cert": Path("/etc/pki/libvirt/clientcert.pem"),
            "key": Path("/etc/pki/libvirt/private/clientkey.pem"),
        }
    home = Path.home() / ".pki" / "libvirt"
    return {"ca": home / "cacert.pem", "cert": home / "clientcert.pem", "key": home / "clientkey.pem"}


@dataclass
class Certificate:
    """kvmweb's TLS client certificate for one host, as read from disk now."""

    path: str
    status: str  # OK, EXPIRING, EXPIRED, MISSING, UNREADABLE
    message: str
    remedy: str = ""
    subject: str = ""
    issuer: str = ""
    not_after: datetime.datetime | None = None
    days_left: int | None = None

    @property
    def needs_attention(self):
        return self.status != OK


def client_certificate(uri, now=None):
    """The Certificate kvmweb presents to the host of ``uri``; None when not qemu+tls."""
    files = tls_files(uri)
    if files is None:
        return None
    path = files["cert"]
    renew = _(
        "Issue a new client certificate from the CA the host trusts and install it as %(path)s "
        "(key in %(key)s, mode 0600); no restart of kvmweb is needed."
    ) % {"path": path, "key": files["key"]}
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Certificate(
            str(path),
            MISSING,
            _("The TLS client certificate %(path)s does not exist.") % {"path": path},
            renew,
        )
    except OSError as exc:
        return Certificate(
            str(path),
            UNREADABLE,
            _("The TLS client certificate %(path)s cannot be read: %(error)s")
            % {"path": path, "error": exc.strerror},
            _("Let the user kvmweb runs as read it."),
        )
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        return Certificate(
            str(path),
            UNREADABLE,
            _("%(path)s is not a PEM certificate: %(error)s") % {"path": path, "error": exc},
            renew,
        )
    now = now or timezone.now()
    not_after = cert.not_valid_after_utc
    days_left = (not_after - now).days
    common = {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "not_after": not_after,
        "days_left": days_left,
    }
    when = not_after.strftime("%Y-%m-%d %H:%M UTC")
    if not_after <= now:
        return Certificate(
            str(path),
            EXPIRED,
            _("The TLS client certificate expired on %(when)s: libvirt refuses to connect with it.")
            % {"when": when},
            renew,
            **common,
        )
    if days_left < warn_days():
        return Certificate(
            str(path),
            EXPIRING,
            _("The TLS client certificate expires on %(when)s, in %(days)s days.")
            % {"when": when, "days": days_left},
            renew,
            **common,
        )
    return Certificate(
        str(path),
        OK,
        _("Valid until %(when)s (%(days)s days).") % {"when": when, "days": days_left},
        **common,
    )


def peer_to_peer(target_uri, tunnelled=False):
    """How a peer-to-peer migration to ``target_uri`` travels, as plain data:
    {"control": text, "data": text, "needs": text, "scheme": scheme}.

    With PEER2PEER it is the source's libvirtd, not kvmweb, that opens ``target_uri``:
    whatever the URI names (certificate directory, SSH key) must exist on the source host
    and be trusted by the target."""
    sch = scheme(target_uri)
    if tunnelled:
        data = _("tunnelled inside that libvirt connection (virsh migrate --p2p --tunnelled)")
    else:
        data = _("a direct connection to the target's migration port, unencrypted (virsh migrate --p2p)")
    if sch == "qemu+tls":
        files = tls_files(target_uri)
        control = _("TLS, from the source's libvirtd to %(uri)s") % {"uri": target_uri}
        needs = _(
            "the source host needs %(ca)s, %(cert)s and %(key)s (the source reads them, not kvmweb) "
            "with a client certificate the target's CA signed"
        ) % {"ca": files["ca"], "cert": files["cert"], "key": files["key"]}
    elif sch == "qemu+ssh":
        control = _("SSH, from the source's libvirtd (as root) to %(uri)s") % {"uri": target_uri}
        needs = _("root on the source host needs an SSH key authorised on the target and its host key known")
    elif sch == "qemu+tcp":
        control = _("plain TCP without encryption to %(uri)s") % {"uri": target_uri}
        needs = _(
            "the target's libvirtd must accept unauthenticated TCP from the source (lab or trusted network only)"
        )
    else:
        control = _("%(uri)s, opened by the source's libvirtd") % {"uri": target_uri}
        needs = _("the source's libvirtd must be able to open that URI")
    return {"scheme": sch, "control": control, "data": data, "needs": needs}


def _on_this_machine(uri):
    """True when the host of ``uri`` is this machine (a local URI or a loopback address):
    then the files the source's libvirtd reads are the very files kvmweb can read."""
    parts = urlsplit(uri or "")
    if parts.scheme in ("qemu", "qemu+unix") or not parts.hostname:
        return True
    import ipaddress

    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return parts.hostname == "localhost"


def migration_check(source, target, tunnelled=False, now=None):
    """The transport part of the migration preflight, as
    (status "pass"|"warn"|"fail", message, remedy, details).

    Says which connection the peer-to-peer migration uses; for qemu+tls hosts checks the
    client certificates kvmweb holds for both (expired or missing: fail, expiring within
    TLS_EXPIRY_WARN_DAYS: warn) and, when the source runs on this machine, the
    certificate the source's libvirtd will present to the target (the same files)."""
    p2p = peer_to_peer(target.uri, tunnelled=tunnelled)
    details = {"control": p2p["control"], "data": p2p["data"], "source_needs": p2p["needs"]}
    fails, warns, remedies = [], [], []
    for role, host in (("source", source), ("target", target)):
        cert = client_certificate(host.uri, now=now)
        if cert is None:
            continue
        details[f"{role}_certificate"] = {
            "path": cert.path,
            "status": cert.status,
            "not_after": cert.not_after.isoformat() if cert.not_after else None,
        }
        if cert.status == EXPIRING:
            warns.append(f"{host.name}: {cert.message}")
            remedies.append(cert.remedy)
        elif cert.status != OK:
            fails.append(f"{host.name}: {cert.message}")
            remedies.append(cert.remedy)
    if p2p["scheme"] == "qemu+tls":
        local = _on_this_machine(source.uri)
        details["source_files_verified"] = local
        if local and not fails:
            # The source's libvirtd reads the pkipath of the target's URI on its own machine,
            # which here is this machine: the target certificate check above covered it.
            details["source_needs"] = _("met: the source runs on this machine and the files were checked")
    sentence = _("Peer-to-peer: control connection over %(control)s; memory over %(data)s.") % {
        "control": p2p["control"],
        "data": p2p["data"],
    }
    if fails:
        return "fail", " ".join(fails), " ".join(dict.fromkeys(remedies)), details
    if warns:
        return "warn", " ".join(warns + [sentence]), " ".join(dict.fromkeys(remedies)), details
    needs = (
        ""
        if details.get("source_files_verified")
        else " " + _("Requires: %(needs)s.") % {"needs": p2p["needs"]}
    )
    return "pass", sentence + needs, "", details


# ------------------------------------------------------------------ kvmweb's SSH identity


def ssh_key_path():
    """kvmweb's SSH private key: KVMWEB_SSH_KEY_FILE, else <data dir>/ssh/id_ed25519."""
    configured = getattr(settings, "SSH_KEY_FILE", "")
    return Path(configured) if configured else Path(settings.DATA_DIR) / "ssh" / "id_ed25519"


@dataclass
class SSHIdentity:
    """The public half of kvmweb's SSH key, to paste into a host's authorized_keys."""

    path: str
    public_key: str
    fingerprint: str  # SHA256:..., as `ssh-keygen -lf` prints it


def _fingerprint(public_line):
    import base64
    import hashlib

    blob = base64.b64decode(public_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def ssh_identity():
    """kvmweb's SSHIdentity, or None when there is no key yet.  Reads ``<key>.pub``, or
    derives the public key from the private one (a key given by KVMWEB_SSH_KEY_FILE may
    come without its .pub)."""
    path = ssh_key_path()
    pub = path.with_name(path.name + ".pub")
    try:
        line = pub.read_text().strip()
    except FileNotFoundError:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        from cryptography.hazmat.primitives import serialization

        key = serialization.load_ssh_private_key(data, password=None)
        line = (
            key.public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            .decode()
        )
    return SSHIdentity(str(path), line, _fingerprint(line))


def generate_ssh_key(comment="kvmweb"):
    """Create kvmweb's ed25519 key at ssh_key_path(): private 0600 in a 0700 directory,
    public ``.pub`` next to it.  Never overwrites (FileExistsError): hosts already trust
    the key that is there.  Returns the SSHIdentity."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    path = ssh_key_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    # O_EXCL: two administrators pressing the button at once get one key, not two.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    pub = path.with_name(path.name + ".pub")
    pub.write_text(f"{public.decode()} {comment}\n")
    return ssh_identity()
