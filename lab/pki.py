"""The lab's certificate authority: TLS certificates for libvirtd and QEMU on lab hosts.

Layout under ``$LAB_DIR/pki`` (created once, kept across `down`; `down --purge` removes it):

    ca/cacert.pem, ca/cakey.pem                  the lab CA (10 years)
    <host>/servercert.pem, <host>/serverkey.pem  libvirtd's TLS listener (SAN: IP + FQDN)
    <host>/qemu/{ca-cert,server-cert,server-key,client-cert,client-key}.pem
                                                 QEMU's native TLS migration (``--tls``)
    client/{cacert,clientcert,clientkey}.pem     a client: ``?pkipath=$LAB_DIR/pki/client``
    client-expired/...                           same CA, certificate expired yesterday
    client-foreign/...                           signed by another CA the hosts do not trust

``client`` is what both kvmweb and the source libvirtd (peer-to-peer migration) use: the
directory is outside the bind-mounted /etc, so every host namespace sees the same path.
Private keys are 0600.  Uses `cryptography` (already in the venv for Twisted/autobahn).
"""

import datetime
import ipaddress
import os
from pathlib import Path

CLIENT_DIRS = ("client", "client-expired", "client-foreign")


def _crypto():
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    return x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # atomic: a half-written key is never read by libvirtd


def _new_key():
    _x, _h, _s, ec, _e, _n = _crypto()
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    _x, _h, serialization, _ec, _e, _n = _crypto()
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _pem_cert(cert) -> bytes:
    _x, _h, serialization, _ec, _e, _n = _crypto()
    return cert.public_bytes(serialization.Encoding.PEM)


def _load(cert_path: Path, key_path: Path):
    x509, _h, serialization, _ec, _e, _n = _crypto()
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    return cert, key


def _issue(
    subject_cn, key, issuer_cert, issuer_key, *, ca=False, server=False, client=False, sans=(), days=3650
):
    x509, hashes, _s, _ec, EKU, NameOID = _crypto()
    now = datetime.datetime.now(datetime.UTC)
    if days < 0:  # an already expired certificate (for the failure tests)
        not_before, not_after = now - datetime.timedelta(days=30), now + datetime.timedelta(days=days)
    else:
        not_before, not_after = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=days)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kvmweb lab"),
            x509.NameAttribute(NameOID.COMMON_NAME, subject_cn),
        ]
    )
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert is not None else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        b = b.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        b = b.add_extension(
            x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True
        )
        usages = ([EKU.SERVER_AUTH] if server else []) + ([EKU.CLIENT_AUTH] if client else [])
        b = b.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if sans:
        entries = []
        for s in sans:
            try:
                entries.append(x509.IPAddress(ipaddress.ip_address(s)))
            except ValueError:
                entries.append(x509.DNSName(s))
        b = b.add_extension(x509.SubjectAlternativeName(entries), critical=False)
    return b.sign(issuer_key if issuer_key is not None else key, hashes.SHA256())


def pki_dir(lab_dir: Path) -> Path:
    return lab_dir / "pki"


def client_dir(lab_dir: Path, kind: str = "client") -> Path:
    """A pkipath directory (cacert.pem, clientcert.pem, clientkey.pem) for libvirt clients."""
    if kind not in CLIENT_DIRS:
        raise ValueError(kind)
    return pki_dir(lab_dir) / kind


def _ca(lab_dir: Path, name: str = "ca"):
    d = pki_dir(lab_dir) / name
    if (d / "cacert.pem").exists() and (d / "cakey.pem").exists():
        return _load(d / "cacert.pem", d / "cakey.pem")
    key = _new_key()
    cert = _issue(f"kvmweb lab CA ({name})", key, None, None, ca=True)
    _write(d / "cakey.pem", _pem_key(key), private=True)
    _write(d / "cacert.pem", _pem_cert(cert))
    return cert, key


def _client(lab_dir: Path, kind: str, ca_cert, ca_key, trusted_ca_cert, days: int) -> None:
    d = client_dir(lab_dir, kind)
    if (d / "clientcert.pem").exists():
        return
    key = _new_key()
    cert = _issue(f"kvmweb ({kind})", key, ca_cert, ca_key, client=True, days=days)
    _write(d / "cacert.pem", _pem_cert(trusted_ca_cert))
    _write(d / "clientkey.pem", _pem_key(key), private=True)
    _write(d / "clientcert.pem", _pem_cert(cert))


def ensure(lab_dir: Path, hosts: dict) -> None:
    """Create whatever is missing: the CA, the client directories, and for every host in
    ``hosts`` ({name: (ip, fqdn)}) its libvirtd and QEMU certificates.  Idempotent."""
    ca_cert, ca_key = _ca(lab_dir)
    _client(lab_dir, "client", ca_cert, ca_key, ca_cert, 3650)
    _client(lab_dir, "client-expired", ca_cert, ca_key, ca_cert, -1)
    foreign_cert, foreign_key = _ca(lab_dir, "foreign-ca")
    _client(lab_dir, "client-foreign", foreign_cert, foreign_key, ca_cert, 3650)
    for name, (addr, fqdn) in hosts.items():
        d = pki_dir(lab_dir) / name
        if (d / "servercert.pem").exists() and (d / "qemu" / "client-cert.pem").exists():
            continue
        key = _new_key()
        # libvirtd uses the server certificate also as its client certificate when it is
        # the source of a peer-to-peer migration over qemu+tls without pkipath: allow both.
        cert = _issue(addr, key, ca_cert, ca_key, server=True, client=True, sans=(addr, fqdn, name))
        _write(d / "serverkey.pem", _pem_key(key), private=True)
        _write(d / "servercert.pem", _pem_cert(cert))
        q = d / "qemu"
        _write(q / "ca-cert.pem", _pem_cert(ca_cert))
        _write(q / "server-key.pem", _pem_key(key), private=True)
        _write(q / "server-cert.pem", _pem_cert(cert))
        _write(q / "client-key.pem", _pem_key(key), private=True)
        _write(q / "client-cert.pem", _pem_cert(cert))
