"""libvirt's migration-iteration event on the KVM lab: the gateway reports the second
pass over memory while the migrate call still runs (what a worker chaining batch
children starts the next child's re-check on: migrations_app/modes/live.watch_passes)."""

import time

import pytest

import lab as labkit
from hosts import hypervisor as hv

pytestmark = pytest.mark.lab


def test_it_reports_the_second_pass_over_memory_before_the_migrate_call_returns(lab, lab_guest):
    guest = lab_guest("passes", memory_mib=128)
    passes = []
    flags = sum(hv.MIGRATE_FLAGS[f] for f in ("live", "peer2peer", "persist_dest", "undefine_source"))
    with hv.connect(labkit.uri("lab-a"), call_timeout=120) as source:
        watch = source.watch_migration_passes(guest.uuid, lambda it: passes.append((time.monotonic(), it)))
        source.migrate(guest.uuid, labkit.uri("lab-b"), flags, {hv.MIGRATE_PARAMS["bandwidth"]: 32})
        returned = time.monotonic()
        source.unwatch(watch)
        source.unwatch(watch)  # twice: no error
    second = [at for at, iteration in passes if iteration >= 2]
    assert second, passes
    assert second[0] < returned
    assert labkit.wait_counter_moves("lab-b", guest.name) > 0  # it runs on the target now
