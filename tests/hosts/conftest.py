"""Fixtures of the host tests: TLS client certificate directories (pkipath) made with the
lab CA code (lab/pki.py), valid for a chosen number of days."""

import pytest


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
