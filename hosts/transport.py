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

import contextlib
import datetime
import os
import time
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


# ------------------------------------------------------------------ a host's own certificates
#
# An administrator gives a qemu+tls host its own CA and client certificate (the host's
# Certificate page): uploaded PEMs are checked (key matches, CA signed it, valid now, a
# client certificate), written by kvmweb into a new directory <data dir>/pki/hosts/<pk>-<fp>/
# (0700; key 0600) and the host's URI gets ``pkipath=`` that directory.  A new directory
# per upload, not files overwritten in place: a connection being opened meanwhile reads
# either the old three files or the new three, never a mix.  Or the administrator names
# a pkipath directory they manage (the same path on every source host, for peer to peer).


class CertificateProblem(ValueError):
    """What is wrong with a certificate bundle or directory; ``remedy`` says what to do."""

    def __init__(self, message, remedy=""):
        super().__init__(message)
        self.remedy = remedy


def managed_pki_root():
    """Where kvmweb keeps the certificates administrators upload: <data dir>/pki/hosts."""
    return Path(settings.DATA_DIR) / "pki" / "hosts"


def with_pkipath(uri, path):
    """``uri`` with its ``pkipath`` parameter set to ``path`` (other parameters kept)."""
    parts = urlsplit(uri)
    kept = [p for p in parts.query.split("&") if p and not p.lower().startswith("pkipath=")]
    query = "&".join(sorted([*kept, f"pkipath={path}"], key=str.lower))
    return parts._replace(query=query).geturl()


def _fingerprint_sha256(cert):
    from cryptography.hazmat.primitives import hashes

    return cert.fingerprint(hashes.SHA256()).hex()


def check_bundle(ca_pem, cert_pem, key_pem, now=None):
    """Check an uploaded CA + client certificate + key; returns facts for the audit
    ({subject, issuer, not_after, fingerprint}) or raises CertificateProblem.

    Refused: text that is not PEM, a key that does not belong to the certificate, a
    certificate the given CA did not sign, one not valid now (expired or not yet), one
    whose extended key usage excludes TLS client authentication, an encrypted key (libvirt
    cannot ask for a passphrase)."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    def load(what, fn):
        try:
            return fn()
        except (ValueError, TypeError) as exc:
            raise CertificateProblem(
                _("The %(what)s is not readable PEM: %(error)s") % {"what": what, "error": exc},
                _("Paste the whole PEM text, from -----BEGIN to -----END."),
            ) from None

    cas = load(_("CA certificate"), lambda: x509.load_pem_x509_certificates(ca_pem.strip().encode()))
    cert = load(_("client certificate"), lambda: x509.load_pem_x509_certificate(cert_pem.strip().encode()))
    try:
        key = serialization.load_pem_private_key(key_pem.strip().encode(), password=None)
    except TypeError:
        raise CertificateProblem(
            _("The private key is encrypted: libvirt cannot ask for its passphrase."),
            _(
                "Remove the passphrase (openssl pkey -in clientkey.pem -out clientkey.pem) and upload it again."
            ),
        ) from None
    except ValueError as exc:
        raise CertificateProblem(
            _("The %(what)s is not readable PEM: %(error)s") % {"what": _("private key"), "error": exc},
            _("Paste the whole PEM text, from -----BEGIN to -----END."),
        ) from None
    pub = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*pub) != cert.public_key().public_bytes(*pub):
        raise CertificateProblem(
            _("The private key does not belong to the client certificate."),
            _("Upload the key the certificate was issued for."),
        )
    signed = False
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
            signed = True
            break
        except (ValueError, TypeError, InvalidSignature):
            continue
    if not signed:
        raise CertificateProblem(
            _("The client certificate (issuer %(issuer)s) was not signed by the CA certificate given.")
            % {"issuer": cert.issuer.rfc4514_string()},
            _("Give the CA that signed the client certificate, the one the host trusts in its cacert.pem."),
        )
    now = now or timezone.now()
    when = cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC")
    if cert.not_valid_after_utc <= now:
        raise CertificateProblem(
            _("The client certificate expired on %(when)s: libvirt would refuse to connect with it.")
            % {"when": when},
            _("Issue a new client certificate from the CA the host trusts and upload that one."),
        )
    if cert.not_valid_before_utc > now:
        raise CertificateProblem(
            _("The client certificate is not valid before %(when)s.")
            % {"when": cert.not_valid_before_utc.strftime("%Y-%m-%d %H:%M UTC")},
            _("Check the clocks of kvmweb's machine and of the CA (NTP)."),
        )
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
        raise CertificateProblem(
            _("The certificate is not for TLS clients (its extended key usage lacks clientAuth)."),
            _("Issue it with tls_www_client (certtool) or extendedKeyUsage = clientAuth (openssl)."),
        )
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "fingerprint": _fingerprint_sha256(cert),
    }


def write_bundle(owner, ca_pem, cert_pem, key_pem, fingerprint):
    """Write a checked bundle into a new directory <managed root>/<owner>-<fp12>/ (owner:
    the host's id, or "new" for a host not registered yet) and return it: cacert.pem and
    clientcert.pem 0644, clientkey.pem 0600, directory 0700."""
    root = managed_pki_root()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = root / f"{owner}-{fingerprint[:12]}"
    tmp = root / f".{target.name}.{os.getpid()}.tmp"
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700)
    for name, text, mode in (
        ("cacert.pem", ca_pem, 0o644),
        ("clientcert.pem", cert_pem, 0o644),
        ("clientkey.pem", key_pem, 0o600),
    ):
        fd = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text.strip() + "\n")
    shutil.rmtree(target, ignore_errors=True)  # the same bundle uploaded again
    os.replace(tmp, target)
    return target


def staged_bundles(older_than):
    """Directories in the managed root that the Add host wizard staged (``new-*``) or a
    crashed write left (``.*.tmp``), last changed more than ``older_than`` seconds ago."""
    root = managed_pki_root()
    if not root.is_dir():
        return []
    cutoff = time.time() - older_than
    found = []
    for path in root.iterdir():
        staged = path.name.startswith("new-") or (path.name.startswith(".") and path.name.endswith(".tmp"))
        with contextlib.suppress(FileNotFoundError):  # removed by a concurrent sweep
            if staged and path.is_dir() and not path.is_symlink() and path.stat().st_mtime < cutoff:
                found.append(path)
    return sorted(found)


def managed_dir(uri):
    """The directory kvmweb stored for ``uri``'s pkipath, or None when the URI names no
    pkipath or one kvmweb does not manage."""
    files = tls_files(uri)
    if not files:
        return None
    directory = files["cert"].parent
    return directory if _is_managed(directory) else None


def _is_managed(directory):
    """True for a directory right inside the managed root. Compared after resolving: a
    pkipath such as <root>/.. has the root as its textual parent but names the directory
    above it (all hosts' certificates), which must never be deleted as one host's."""
    path = Path(directory)
    if path.name in ("", ".", ".."):
        return False
    return path.resolve().parent == managed_pki_root().resolve()


def remove_bundle(directory):
    """Delete a directory kvmweb stored (key included); only inside the managed root."""
    import shutil

    if directory is not None and _is_managed(directory):
        shutil.rmtree(directory, ignore_errors=True)


def check_pkipath(path, now=None):
    """Check a pkipath directory an administrator names: absolute, the three files
    there, the certificate readable and not expired.  Returns the Certificate or raises
    CertificateProblem."""
    path = (path or "").strip().rstrip("/")
    if not path.startswith("/"):
        raise CertificateProblem(_("Give an absolute directory path."))
    missing = [n for n in ("cacert.pem", "clientcert.pem", "clientkey.pem") if not (Path(path) / n).is_file()]
    if missing:
        raise CertificateProblem(
            _("%(dir)s lacks %(files)s.") % {"dir": path, "files": ", ".join(missing)},
            _("Put cacert.pem, clientcert.pem and clientkey.pem (0600) in the directory."),
        )
    cert = client_certificate(f"qemu+tls://host/system?pkipath={path}", now=now)
    if cert.status not in (OK, EXPIRING):
        raise CertificateProblem(cert.message, cert.remedy)
    return cert


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
    elif sch in ("qemu+libssh2", "qemu+libssh"):
        params = parse_qs(urlsplit(target_uri).query)
        control = _("SSH (libvirt's own client), from the source's libvirtd to %(uri)s") % {"uri": target_uri}
        needs = _(
            "the source host needs the key %(keyfile)s (authorised on the target) and the known_hosts file "
            "%(known_hosts)s holding the target's confirmed host key (the source reads them, not kvmweb)"
        ) % {
            "keyfile": (params.get("keyfile") or ["~/.ssh/id_*"])[0],
            "known_hosts": (params.get("known_hosts") or ["$XDG_CONFIG_HOME/libvirt/known_hosts"])[0],
        }
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


# ------------------------------------------------------------------ SSH host keys
#
# kvmweb keeps the host keys an administrator confirmed in its own known_hosts file
# (<data dir>/ssh/known_hosts, 0600, OpenSSH format) and names it in every SSH URI it
# builds (``known_hosts=``), with libvirt's default verification: an unknown key refuses
# the connection ("Can't verify the session host key") and a changed one fails with
# "SSH HOST KEY VERIFICATION FAILED".  Only qemu+libssh2 and qemu+libssh honour
# ``known_hosts=``; qemu+ssh runs the ssh binary, which reads ~/.ssh/known_hosts of the
# user.  kvmweb builds qemu+libssh2: libvirt 9.0's libssh transport leaves every reply
# larger than about 4 KiB (capabilities, big domain XML) waiting for the next keepalive
# tick (5 s), measured in the lab; libssh2 answers the same call in 0.04 s.

SSH_SCHEMES = ("qemu+ssh", "qemu+libssh2", "qemu+libssh")
KEYSCAN_TIMEOUT = 5


def known_hosts_path():
    """kvmweb's known_hosts: <data dir>/ssh/known_hosts."""
    return Path(settings.DATA_DIR) / "ssh" / "known_hosts"


@dataclass
class SSHTarget:
    """Where an SSH URI connects: address, port, user and the files it names."""

    address: str
    port: int
    user: str
    keyfile: str
    known_hosts: str

    @property
    def token(self):
        """The host field of a known_hosts line: ``host``, or ``[host]:port`` off port 22."""
        return self.address if self.port == 22 else f"[{self.address}]:{self.port}"


def ssh_target(uri):
    """The SSHTarget of a qemu+ssh / qemu+libssh2 / qemu+libssh URI, else None."""
    if scheme(uri) not in SSH_SCHEMES:
        return None
    parts = urlsplit(uri)
    params = parse_qs(parts.query)
    return SSHTarget(
        address=(parts.hostname or "").strip("[]"),
        port=parts.port or 22,
        user=parts.username or "",
        keyfile=(params.get("keyfile") or [""])[0],
        known_hosts=(params.get("known_hosts") or [""])[0],
    )


@dataclass
class HostKey:
    """One SSH host key: type, base64 blob and its SHA256 fingerprint."""

    keytype: str
    blob: str

    @property
    def fingerprint(self):
        return _fingerprint(f"{self.keytype} {self.blob}")

    def line(self, token):
        return f"{token} {self.keytype} {self.blob}"


class KeyScanError(Exception):
    """ssh-keyscan got no key: the message says why (refused, timeout, not SSH)."""


def scan_host_keys(address, port=22, timeout=KEYSCAN_TIMEOUT):
    """The host keys ``address:port`` presents now, via ``ssh-keyscan`` (bounded by
    ``timeout``).  Raises KeyScanError when none could be read."""
    import subprocess

    try:
        run = subprocess.run(
            ["ssh-keyscan", "-T", str(int(timeout)), "-p", str(int(port)), "--", address],
            capture_output=True,
            text=True,
            timeout=timeout + 5,
        )
    except FileNotFoundError:
        raise KeyScanError(_("ssh-keyscan is not installed (Debian package openssh-client).")) from None
    except subprocess.TimeoutExpired:
        raise KeyScanError(_("No SSH answer within %(s)s s.") % {"s": timeout}) from None
    keys = []
    for line in run.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 3 and not line.startswith("#"):
            keys.append(HostKey(fields[1], fields[2]))
    if not keys:
        raise KeyScanError((run.stderr.strip().splitlines() or [_("no SSH host key received")])[-1])
    return keys


def _known_lines(path=None):
    path = Path(path or known_hosts_path())
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def stored_host_keys(target, path=None):
    """The confirmed HostKeys kvmweb holds for ``target`` (an SSHTarget)."""
    keys = []
    for line in _known_lines(path):
        fields = line.split()
        if len(fields) >= 3 and target.token in fields[0].split(","):
            keys.append(HostKey(fields[1], fields[2]))
    return keys


UNKNOWN, MATCHES, CHANGED = "unknown", "matches", "changed"


def compare_host_keys(stored, scanned):
    """UNKNOWN (nothing stored), MATCHES (a scanned key is stored) or CHANGED (keys are
    stored and none of them is presented any more)."""
    if not stored:
        return UNKNOWN
    stored_set = {(k.keytype, k.blob) for k in stored}
    if any((k.keytype, k.blob) in stored_set for k in scanned):
        return MATCHES
    return CHANGED


def write_host_keys(target, keys, path=None):
    """Replace kvmweb's known_hosts entries of ``target`` with ``keys``: file 0600 in a
    0700 directory, written to a temporary file and renamed (a reader never sees half).
    Callers serialise writers (hosts/services.py holds a lock)."""
    path = Path(path or known_hosts_path())
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    kept = [ln for ln in _known_lines(path) if not (ln.split() and target.token in ln.split()[0].split(","))]
    lines = kept + [k.line(target.token) for k in keys]
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(f"{ln}\n" for ln in lines))
    os.replace(tmp, path)


# ------------------------------------------------------------------ URIs the wizard builds

WIZARD_TRANSPORTS = ("ssh", "tls", "tcp")


def build_uri(transport, address, *, user="root", port=None, pkipath=""):
    """The libvirt URI for the add-host wizard's answers.

    ``ssh`` gives ``qemu+libssh2://USER@ADDRESS[:PORT]/system?keyfile=<kvmweb's key>&
    known_hosts=<kvmweb's known_hosts>``: libvirt then checks the host key against the
    keys an administrator confirmed.  ``tls`` gives ``qemu+tls://ADDRESS[:PORT]/system``
    (``pkipath`` when given); ``tcp`` gives ``qemu+tcp://`` (lab or trusted network only).
    The result still goes through validate_uri()."""
    address = (address or "").strip()
    host = f"[{address}]" if ":" in address and not address.startswith("[") else address
    netloc = host + (f":{int(port)}" if port else "")
    if transport == "ssh":
        user = (user or "root").strip()
        return (
            f"qemu+libssh2://{user}@{netloc}/system?keyfile={ssh_key_path()}&known_hosts={known_hosts_path()}"
        )
    if transport == "tls":
        return f"qemu+tls://{netloc}/system" + (f"?pkipath={pkipath}" if pkipath else "")
    if transport == "tcp":
        return f"qemu+tcp://{netloc}/system"
    raise ValueError(transport)


# ------------------------------------------------------------------ transport options

# Option -> (virsh flag, minimum libvirt version, minimum QEMU version) on both hosts.
TRANSPORT_OPTIONS = {
    "tls": ("--tls", 3_009_000, 2_011_000),
    "tunnelled": ("--p2p --tunnelled", 0, 0),
    "parallel": ("--parallel --parallel-connections N", 5_002_000, 4_000_000),
    "compression": ("--compressed", 0, 0),
}


def _ver(number):
    return f"{number // 1000000}.{number // 1000 % 1000}.{number % 1000}"


def option_support(source_facts, target_facts, options):
    """{option: {"chosen", "supported", "virsh", "note"}} for the migration transport
    options, from both hosts' libvirt and QEMU versions (facts of hosts/hypervisor.py)."""
    out = {}
    for name, (virsh, libvirt_min, qemu_min) in TRANSPORT_OPTIONS.items():
        low_libvirt = min(source_facts.get("libvirt_version") or 0, target_facts.get("libvirt_version") or 0)
        low_qemu = min(
            source_facts.get("hypervisor_version") or 0, target_facts.get("hypervisor_version") or 0
        )
        supported = low_libvirt >= libvirt_min and low_qemu >= qemu_min
        note = ""
        if not supported:
            note = _("needs libvirt %(lv)s and QEMU %(qv)s on both hosts") % {
                "lv": _ver(libvirt_min),
                "qv": _ver(qemu_min),
            }
        elif name == "tls":
            note = _(
                "both hosts need default_tls_x509_cert_dir in qemu.conf with certificates of one CA "
                "(libvirt reports a missing one when the migration starts)"
            )
        out[name] = {"chosen": bool(options.get(name)), "supported": supported, "virsh": virsh, "note": note}
    return out


def with_option_support(result, source_facts, target_facts, options):
    """The transport check's (status, message, remedy, details) with what the hosts
    support of the transport options; a chosen option they do not support fails."""
    status, message, remedy, details = result
    support = option_support(source_facts, target_facts, options)
    details = {**details, "options": support}
    usable = [n for n, s in support.items() if s["supported"]]
    message = f"{message} " + _("Transport options both hosts support: %(names)s.") % {
        "names": ", ".join(f"{n} ({support[n]['virsh']})" for n in usable) or "—"
    }
    refused = [n for n, s in support.items() if s["chosen"] and not s["supported"]]
    if refused:
        status = "fail"
        remedy = " ".join(
            [remedy]
            + [
                _("Turn off %(name)s: it %(note)s.") % {"name": n, "note": support[n]["note"]}
                for n in refused
            ]
        ).strip()
    return status, message, remedy, details
