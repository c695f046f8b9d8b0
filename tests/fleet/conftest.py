"""Shared fixtures of the fleet tests: three test-driver hosts with probe facts, VMs on
the first, and a preflight that answers without contacting libvirt."""

import pytest

from hosts.models import VM, Host
from migrations_app.preflight import CheckResult, Report

GIB = 1024**3


def report(*results):
    """A preflight Report of the given results (a pass when none)."""
    results = list(results) or [CheckResult("connection", "Connections", "pass", "ok")]
    return Report(results=results, verdict=Report.verdict_of(results), started_at="", duration_ms=1)


def prediction(seconds=3.0, downtime=40):
    return CheckResult(
        "prediction",
        "Duration",
        "pass",
        "ok",
        details={"estimated_seconds": seconds, "estimated_downtime_ms": downtime},
    )


@pytest.fixture
def fake_preflight(monkeypatch):
    """Replace run_preflight: ``calls`` records (vm, target, mode); ``answers`` maps a VM
    name to a function (plan) -> Report (default: a pass predicting 3 s)."""

    class Fake:
        calls = []
        answers = {}

        def __call__(self, plan, **kwargs):
            self.calls.append((plan.vm.name, plan.target.name, plan.mode))
            answer = self.answers.get(plan.vm.name)
            return answer(plan) if answer else report(prediction())

    # Views that import run_preflight by name bind it when the URLconf is first loaded:
    # load it before patching, or a page view would keep the fake for later tests.
    import kvmweb.urls  # noqa: F401

    fake = Fake()
    monkeypatch.setattr("migrations_app.preflight.run_preflight", fake)
    return fake


@pytest.fixture
def fleet(db):
    """Hosts ha (source), hb, hc: reachable, 4 CPUs, 8 GiB free each; no VMs yet."""
    hosts = {}
    for i, name in enumerate(("ha", "hb", "hc")):
        hosts[name] = Host.objects.create(
            name=name,
            uri=f"test:///fleet-{i}",
            status=Host.REACHABLE,
            cpus=4,
            memory_total=16 * GIB,
            memory_free=8 * GIB,
        )
    return hosts


@pytest.fixture
def make_vm(fleet):
    """make_vm(name, host="ha", state="running", memory_gib=1, vcpus=1) -> VM."""

    def _make(name, host="ha", state=VM.RUNNING, memory_gib=1, vcpus=1):
        return VM.objects.create(
            uuid=f"00000000-0000-0000-0000-{VM.objects.count() + 1:012d}",
            name=name,
            host=fleet[host],
            state=state,
            memory=int(memory_gib * GIB),
            vcpus=vcpus,
        )

    return _make


@pytest.fixture(scope="module")
def fleet_cluster(lab, tmp_path_factory):
    """A kvmweb of its own (file SQLite DB) with lab-a, lab-b and lab-c registered and a
    real migrations qcluster (tests/migrations_app/conftest.py Cluster). A lab-c this
    starts is left to the lab's own teardown (see _up_until_the_last_session_ends)."""
    import lab as labkit
    from tests.migrations_app.conftest import _prepared

    _up_until_the_last_session_ends(3)
    c = _prepared(tmp_path_factory.mktemp("fleet"))
    c.manage("add_host", "lab-c", labkit.uri("lab-c"), "--no-sync")
    c.start()
    try:
        yield c
    finally:
        c.stop()


def _up_until_the_last_session_ends(n):
    """Start the first n lab hosts and leave the ones this started to the lab's own
    teardown (lab/core.py session: the last session out stops them, only when no other
    session holds a lease and no guest runs there). Stopping lab-c here at the end of this
    module killed other sessions' migrations to it (a concurrent evacuation test failed
    with "the target host's libvirtd went away")."""
    import lab as labkit
    from lab import core

    started = labkit.up(n)
    if started:
        with core._locked():
            auto = set(core._read(core.LAB_DIR / "auto-started").split()) | set(started)
            (core.LAB_DIR / "auto-started").write_text("\n".join(sorted(auto)) + "\n")


@pytest.fixture
def batch_of(fleet, make_vm, operator, fake_preflight):
    """batch_of(n, **limits) -> a started evacuation batch of n running VMs on ha."""
    from fleet import services
    from fleet.planner import make_plan

    def _make(n, stop_on_failure=False, **limits):
        for i in range(n):
            make_vm(f"vm{i}")
        plan = make_plan(
            VM.objects.filter(host=fleet["ha"]), operator, limits=limits or None, measure_dirty_rate=False
        )
        return services.do_create_batch(plan, operator, host=fleet["ha"], stop_on_failure=stop_on_failure)

    return _make
