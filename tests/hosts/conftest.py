"""Fixtures of the host tests: TLS client certificate directories (pkipath) made with the
lab CA code (lab/pki.py), valid for a chosen number of days; the lab with kvmweb's own SSH
key authorised (ssh_lab)."""

import pytest

import lab as labkit
from hosts import transport


@pytest.fixture
def pki_dir(tmp_path):
    """pki_dir(days) -> a pkipath directory whose clientcert.pem expires in ``days`` days
    (negative: already expired), signed by a throwaway CA."""
    from lab import pki

    def make(days, name="client"):
        ca_cert, ca_key = pki._ca(tmp_path)
        d = tmp_path / f"{name}-{days}"
        key = pki._new_key()
        cert = pki._issue("kvmweb", key, ca_cert, ca_key, client=True, days=days)
        pki._write(d / "cacert.pem", pki._pem_cert(ca_cert))
        pki._write(d / "clientkey.pem", pki._pem_key(key), private=True)
        pki._write(d / "clientcert.pem", pki._pem_cert(cert))
        return d

    return make


@pytest.fixture
def ssh_lab(lab, db, settings, tmp_path):
    """The lab with sshd on every host; kvmweb's data dir in tmp_path with a fresh SSH
    key authorised on the lab hosts (only added: other sessions share the lab)."""
    try:
        labkit.require_ssh(lab.hosts)
    except labkit.LabError as exc:
        pytest.fail(str(exc), pytrace=False)
    settings.DATA_DIR = tmp_path
    settings.SSH_KEY_FILE = ""
    identity = transport.generate_ssh_key()
    labkit.authorize_ssh_key(identity.public_key, lab.hosts)
    return lab


@pytest.fixture
def pem_bundle(tmp_path):
    """pem_bundle(days=365, ca="ca", server_only=False) -> (ca_pem, cert_pem, key_pem) as
    text: a client certificate valid for ``days`` (negative: expired), signed by the CA
    named ``ca`` (another name: another CA) made with the lab CA code."""
    from lab import pki

    def make(days=365, ca="ca", server_only=False):
        ca_cert, ca_key = pki._ca(tmp_path / "bundles", ca)
        key = pki._new_key()
        cert = pki._issue(
            "kvmweb", key, ca_cert, ca_key, client=not server_only, server=server_only, days=days
        )
        return pki._pem_cert(ca_cert).decode(), pki._pem_cert(cert).decode(), pki._pem_key(key).decode()

    return make
