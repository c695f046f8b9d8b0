"""The wizard's target ranking reads stored facts only: no libvirt connection to any
target, a fixed number of queries however many hosts there are, and hosts that were
unreachable at their last probe rank last."""

import threading
import time

import pytest
from django.utils import timezone

from hosts import hypervisor
from hosts.models import VM, Host
from migrations_app.preflight import rank_targets

MIB = 1024 * 1024


@pytest.fixture
def fleet(db):
    """A running VM (2 GiB, network "default") on src, and 40 possible targets: every
    fifth unreachable at its last probe, one never probed, one with too little memory,
    one without the network, one of another architecture, one in maintenance."""
    now = timezone.now()

    def host(name, **facts):
        defaults = dict(
            uri=f"qemu+tcp://{name}.example/system",
            status=Host.REACHABLE,
            last_probe_at=now,
            last_seen_at=now,
            arch="x86_64",
            cpu_vendor="Intel",
            cpu_model="Skylake-Client-IBRS",
            memory_total=64 * 1024 * MIB,
            memory_free=32 * 1024 * MIB,
            networks=[{"name": "default", "bridge": "virbr0", "active": True}],
        )
        return Host.objects.create(name=name, **dict(defaults, **facts))

    src = host("src")
    vm = VM.objects.create(
        uuid="6695eb01-f6a4-8304-79aa-000000000040",
        name="web40",
        host=src,
        state=VM.RUNNING,
        memory=2048 * MIB,
        interfaces=[{"type": "network", "network": "default", "bridge": "", "mac": "52:54:00:00:00:40"}],
    )
    for i in range(40):
        if i % 5 == 0:
            host(f"t{i:02d}", status=Host.UNREACHABLE, last_error="connection refused", memory_free=None)
        else:
            host(f"t{i:02d}", memory_free=(8 + i) * 1024 * MIB)
    Host.objects.filter(name="t01").update(status=Host.UNKNOWN, last_probe_at=None, memory_free=None)
    Host.objects.filter(name="t02").update(memory_free=1024 * MIB)
    Host.objects.filter(name="t03").update(networks=[])
    Host.objects.filter(name="t04").update(arch="aarch64")
    Host.objects.filter(name="t06").update(maintenance=True)
    return vm


@pytest.fixture
def connects(monkeypatch):
    """Every hypervisor.connect call (from any thread) is recorded; it blocks until the
    test ends, like a hung host, then refuses."""
    calls, release = [], threading.Event()

    def connect(uri, **kw):
        calls.append(uri)
        release.wait(30)
        raise hypervisor.HypervisorError("refused in the test")

    monkeypatch.setattr(hypervisor, "connect", connect)
    yield calls
    release.set()


def test_it_ranks_forty_hosts_from_stored_facts_without_libvirt(
    fleet, connects, django_assert_max_num_queries
):
    started = time.monotonic()
    with django_assert_max_num_queries(3):
        ranked = rank_targets(fleet, "cold", {"start_on_target": True})
    assert time.monotonic() - started < 5  # nothing waits for a host (each would hang 30 s)
    assert connects == []
    names = [h.name for h, _r in ranked]
    assert "src" not in names and "t06" not in names and len(names) == 39
    # Ready hosts first, most free memory first; unreachable ones last.
    assert names[0] == "t39"
    unreachable = {f"t{i:02d}" for i in range(0, 40, 5)}
    assert set(names[-len(unreachable) :]) == unreachable
    reports = {h.name: r for h, r in ranked}
    assert reports["t39"].verdict == "pass"
    assert reports["t10"].result("connection").status == "fail"
    assert "connection refused" in reports["t10"].result("connection").message
    assert reports["t01"].result("connection").status == "warn"
    assert reports["t02"].result("memory").status == "fail"
    assert reports["t03"].result("networks").status == "fail"
    assert reports["t04"].result("cpu").status == "fail"


def test_it_primes_only_the_source_for_a_live_ranking_and_does_not_wait(fleet, connects):
    started = time.monotonic()
    ranked = rank_targets(fleet, "live")
    assert time.monotonic() - started < 5  # the source's connect hangs; ranking did not wait
    assert len(ranked) == 39
    deadline = time.monotonic() + 10
    while not connects and time.monotonic() < deadline:
        time.sleep(0.05)
    assert connects == [fleet.host.uri]  # the background dirty-rate measurement, nothing else


def test_it_query_count_does_not_grow_with_hosts(fleet, connects, django_assert_num_queries):
    with django_assert_num_queries(1):
        rank_targets(fleet, "offline")
    Host.objects.create(name="t99", uri="qemu+tcp://t99.example/system", status=Host.REACHABLE)
    with django_assert_num_queries(1):
        assert len(rank_targets(fleet, "offline")) == 40
