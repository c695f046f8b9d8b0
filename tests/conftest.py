"""Shared fixtures: personas, test-driver hosts, and the audit-guard dance for
transactional tests.

Personas: admin (Administrator), operator, auditor, alice and bob (Self-service), mallory
(signed in, no role). Each is a real user in the real role group created by the data
migration, so tests exercise the real permission wiring.
"""

import shutil
from pathlib import Path

import pytest
from django.contrib.auth.models import Group, User

from kvmweb.accounts.roles import ADMINISTRATOR, AUDITOR, OPERATOR, SELF_SERVICE

PASSWORD = "correct horse battery staple"
TESTNODE = Path(__file__).parent / "data" / "testnode.xml"


def _persona(username, role=None):
    user = User.objects.create_user(username=username, password=PASSWORD)
    if role:
        user.groups.add(Group.objects.get(name=role))
    return user


@pytest.fixture
def admin(db):
    return _persona("admin", ADMINISTRATOR)


@pytest.fixture
def operator(db):
    return _persona("operator", OPERATOR)


@pytest.fixture
def auditor(db):
    return _persona("auditor", AUDITOR)


@pytest.fixture
def alice(db):
    return _persona("alice", SELF_SERVICE)


@pytest.fixture
def bob(db):
    return _persona("bob", SELF_SERVICE)


@pytest.fixture
def mallory(db):
    return _persona("mallory")


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    """Personas are created per test; PBKDF2 at full strength costs ~0.3 s per user (more
    on a loaded machine). Sign-in still checks the password, with a cheap hasher."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def login(client):
    """login(user) -> a test client signed in as that user."""

    def _login(user):
        client.force_login(user)
        return client

    return _login


@pytest.fixture
def node_xml(tmp_path):
    """node_xml(name="a", **edits) -> path of a fresh copy of the test-driver node file.

    Each test:///path.xml connection is an independent in-process hypervisor, so every
    test (and every simulated host) gets its own state.
    """

    def _make(name="a", text=None):
        path = tmp_path / f"node-{name}.xml"
        if text is None:
            shutil.copy(TESTNODE, path)
        else:
            path.write_text(text)
        return path

    return _make


@pytest.fixture(autouse=True, scope="session")
def _test_driver_dir(tmp_path_factory):
    """test:// node files are accepted only under KVMWEB_TEST_DRIVER_DIR (hosts/uris.py);
    every test writes its node files under pytest's temporary directory."""
    from django.conf import settings

    before = getattr(settings, "KVMWEB_TEST_DRIVER_DIR", None)
    settings.KVMWEB_TEST_DRIVER_DIR = str(tmp_path_factory.getbasetemp())
    yield
    settings.KVMWEB_TEST_DRIVER_DIR = before


@pytest.fixture(autouse=True)
def _audit_guards_for_transactional_tests(request):
    """Transactional tests end with a table flush (DELETE on SQLite), which the audit
    table's append-only triggers refuse. Install the guards for the test, drop them just
    before the flush."""
    marker = request.node.get_closest_marker("django_db")
    by_marker = marker is not None and bool(marker.kwargs.get("transaction", marker.args[:1] == (True,)))
    by_fixture = {"transactional_db", "live_server"} & set(request.fixturenames)
    if not by_marker and not by_fixture:
        yield
        return
    # Set the database up from inside this fixture, so that its teardown (the flush) runs
    # after ours (autouse fixtures are set up first, so otherwise the flush came first).
    request.getfixturevalue("transactional_db")
    from django.db import connection

    from kvmweb.audit import guards

    guards.install(connection)
    yield
    guards.remove(connection)


@pytest.fixture(autouse=True)
def _default_language():
    """A request made in another language leaves that language active on the thread
    (LocaleMiddleware activates it and nothing resets it): every test starts and ends in
    the default language, so messages asserted in English do not depend on test order."""
    from django.utils import translation

    translation.deactivate()
    yield
    translation.deactivate()


@pytest.fixture
def real_port_probes():
    """Ask for it to let the preflight's migration_ports check really connect (see below)."""


@pytest.fixture(autouse=True)
def _port_probes(request, monkeypatch):
    """The preflight check migration_ports opens TCP connections to the target's ports
    (hosts/reach.py). Outside the lab the hosts are fakes whose addresses (10.0.0.x) may
    lead anywhere on a CI machine: they answer "closed" (reachable) from kvmweb. Lab tests
    (marker lab) and tests asking for real_port_probes connect for real, with no result
    cached from an earlier test."""
    from django.core.cache import cache

    from hosts import reach

    if request.node.get_closest_marker("lab") or "real_port_probes" in request.fixturenames:
        cache.clear()
        return

    def answer_closed(source, address, ports, **_kwargs):
        return reach.Reach(reach.KVMWEB, address, [reach.PortState(p, reach.CLOSED) for p in ports], "test")

    monkeypatch.setattr(reach, "measure", answer_closed)


@pytest.fixture(autouse=True)
def _fresh_channel_layers():
    """Every test gets fresh channel layer instances. A channels-redis layer keeps asyncio
    locks bound to the event loop that first used it, and each async test (and each
    async_to_sync call) runs its own loop: a layer shared across tests fails with "bound
    to a different event loop" (the scale-out pass runs the tests on Redis)."""
    from channels.layers import channel_layers

    channel_layers.backends.clear()
    yield


@pytest.fixture
def site(tmp_path):
    """A kvmweb of its own served by real processes (tests/sites.py), stopped after the test."""
    from tests.sites import Site

    site = Site(tmp_path)
    yield site
    site.stop()
