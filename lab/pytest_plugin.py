"""pytest fixtures for the KVM lab; import them into a conftest.py:

    from lab.pytest_plugin import lab, lab_guest  # noqa: F401

`lab` (session): brings the lab up or reuses a running one; tears down, at the end, only
hosts it started (and only when no other test session still uses them).  Skips with a
reason only when not root or libvirtd is absent; any other lab problem fails loudly.
`lab_guest` (function): factory for uniquely named dirtier guests, removed after the test.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

import pytest

import lab as labkit


@dataclass
class LabHandle:
    """What the `lab` fixture yields: the hosts in use plus shortcuts into `lab`."""

    hosts: list
    started: list = field(default_factory=list)
    start_seconds: float = 0.0
    swept: list = field(default_factory=list)

    conn = staticmethod(labkit.conn)
    uri = staticmethod(labkit.uri)
    ip = staticmethod(labkit.ip)
    read_counter = staticmethod(labkit.read_counter)
    wait_counter_moves = staticmethod(labkit.wait_counter_moves)

    def domain_names(self, host: str) -> set:
        return {d.name() for d in labkit.conn(host).listAllDomains()}


class LabGuest(str):
    """A guest's name (so it can be used wherever a name is expected) with its facts."""

    uuid: str
    host: str
    storage: str

    def __new__(cls, name, *, uuid, host, storage):
        obj = super().__new__(cls, name)
        obj.uuid, obj.host, obj.storage = uuid, host, storage
        return obj

    @property
    def name(self) -> str:
        return str(self)


_summary: list = []


def pytest_terminal_summary(terminalreporter):
    """One line saying what the lab cost this session (started cold or reused)."""
    for handle in _summary:
        what = f"started {', '.join(handle.started)}" if handle.started else "reused the running lab"
        virt_file = labkit.LAB_DIR / "virt"  # never probe here: the lab may be down by now
        virt = virt_file.read_text().strip() if virt_file.exists() else "not probed"
        swept = f"; swept {len(handle.swept)} guests of killed sessions" if handle.swept else ""
        terminalreporter.write_line(f"kvm lab: {what} in {handle.start_seconds:.2f} s (virt {virt}){swept}")


@pytest.fixture(scope="session")
def lab():
    reason = labkit.skip_reason()
    if reason:
        pytest.skip(reason)
    t0 = time.monotonic()
    try:
        ctx = labkit.session(2)
        started = ctx.__enter__()
    except labkit.LabError as exc:
        pytest.fail(f"the KVM lab did not start: {exc}", pytrace=False)
    swept = labkit.sweep_orphans()  # guests left by killed sessions
    handle = LabHandle(
        hosts=labkit.HOST_NAMES[:2], started=started, start_seconds=time.monotonic() - t0, swept=swept
    )
    _summary.append(handle)
    try:
        yield handle
    finally:
        ctx.__exit__(None, None, None)


@pytest.fixture
def lab_guest(lab):
    made = []

    def make(prefix="t", *, host="lab-a", storage="shared", running=True, wait=True, **kwargs):
        """Create a guest named PREFIX-<random>; wait=True waits until its counter moves."""
        name = f"{prefix}-{secrets.token_hex(4)}"
        made.append(name)  # recorded first: a half-created guest is cleaned up too
        labkit.claim(name)  # if this session is killed, a later one sweeps the guest
        uuid = labkit.create_guest(name, host=host, storage=storage, running=running, **kwargs)
        if running and wait:
            labkit.wait_counter_moves(host, name)
        return LabGuest(name, uuid=uuid, host=host, storage=storage)

    yield make
    for name in made:
        labkit.remove_guest(name)
        labkit.release(name)
