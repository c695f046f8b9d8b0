"""The dirty-rate store (migrations_app/dirtyrate.py): a measurement younger than
KVMWEB_PREFLIGHT_DIRTY_RATE_MAX_AGE seconds is reused by every process's checklist."""

import time
from datetime import timedelta

import pytest
from django.utils import timezone

from migrations_app import dirtyrate, preflight
from migrations_app.models import DirtyRateSample
from migrations_app.preflight.checks import prediction
from tests.migrations_app.test_preflight import fake  # noqa: F401 - the scripted-hosts fixture

UUID = "11111111-2222-3333-4444-555555555501"


def _measured(mib=7, at=None):
    return {"mib_per_s": mib, "mode": "page-sampling", "period": 1, "measured_at": at or time.time()}


@pytest.mark.django_db
def test_it_stores_a_fresh_measurement_and_recalls_it_as_stored():
    assert dirtyrate.recall(UUID) is None
    assert dirtyrate.remember(UUID, "alpha", _measured(7)) is True
    row = DirtyRateSample.objects.get(vm_uuid=UUID)
    assert (row.host_name, row.mib_per_s, row.mode, row.period) == ("alpha", 7, "page-sampling", 1)
    got = dirtyrate.recall(UUID)
    assert got["mib_per_s"] == 7 and got["stored"] is True and got["age_s"] < 5
    # A recalled measurement is not stored again (its time would not change anyway).
    assert dirtyrate.remember(UUID, "beta", got) is False
    assert DirtyRateSample.objects.get(vm_uuid=UUID).host_name == "alpha"


@pytest.mark.django_db
def test_it_keeps_one_row_per_guest_and_the_newest_wins():
    dirtyrate.remember(UUID, "alpha", _measured(7))
    dirtyrate.remember(UUID, "beta", _measured(30))
    assert DirtyRateSample.objects.filter(vm_uuid=UUID).count() == 1
    assert dirtyrate.recall(UUID)["mib_per_s"] == 30


@pytest.mark.django_db
def test_it_ignores_a_measurement_older_than_the_window(settings):
    settings.PREFLIGHT_DIRTY_RATE_MAX_AGE = 60
    dirtyrate.remember(UUID, "alpha", _measured(7, at=time.time() - 61))
    assert DirtyRateSample.objects.filter(vm_uuid=UUID).exists()
    assert dirtyrate.recall(UUID) is None
    later = timezone.now() + timedelta(seconds=30)
    dirtyrate.remember(UUID, "alpha", _measured(9))
    assert dirtyrate.recall(UUID, now=later)["age_s"] >= 29
    settings.PREFLIGHT_DIRTY_RATE_MAX_AGE = 0  # reuse switched off
    assert dirtyrate.recall(UUID) is None
    assert dirtyrate.remember(UUID, "alpha", _measured(11)) is False


def test_it_reuses_a_measurement_stored_by_another_process(fake):  # noqa: F811
    first = fake("live")["prediction"].details
    assert fake.scripts[fake.a.uri]["measured"] == 1
    assert DirtyRateSample.objects.get(vm_uuid=UUID).mib_per_s == 5
    assert "stored" not in first["dirty_rate"]
    # Another process: its in-process reuse is empty, the stored measurement is not.
    prediction._dirty_cache.clear()
    fake.scripts[fake.a.uri]["dirty"] = 99  # a new measurement would say so
    second = fake("live")["prediction"].details
    assert fake.scripts[fake.a.uri]["measured"] == 1
    assert second["dirty_rate"]["stored"] is True and second["dirty_rate_mib_s"] == 5
    # Once the stored one is too old, the next checklist measures again and stores that.
    DirtyRateSample.objects.update(measured_at=timezone.now() - timedelta(minutes=5))
    prediction._dirty_cache.clear()
    third = fake("live")["prediction"].details
    assert fake.scripts[fake.a.uri]["measured"] == 2 and third["dirty_rate_mib_s"] == 99
    assert DirtyRateSample.objects.get(vm_uuid=UUID).mib_per_s == 99


def test_it_neither_reads_nor_measures_in_a_quick_checklist(fake):  # noqa: F811
    dirtyrate.remember(UUID, "alpha", _measured(42))
    from migrations_app.plan import MigrationPlan

    plan = MigrationPlan(vm=fake.vm, source=fake.a, target=fake.b, mode="live", options={})
    details = {r.id: r for r in preflight.run_preflight(plan, measure_dirty_rate=False).results}
    assert details["prediction"].details["dirty_rate_mib_s"] == 0.0
    assert fake.scripts[fake.a.uri].get("measured", 0) == 0
