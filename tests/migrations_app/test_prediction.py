"""Learned costs per host pair: the fixed part of a live migration's duration and its
downtime floor, learned from finished jobs and included in the preflight's estimate."""

from datetime import timedelta

from django.utils import timezone

from hosts.models import VM, Host
from migrations_app import prediction
from migrations_app.models import MigrationCostSample, MigrationJob
from migrations_app.plan import MigrationPlan
from migrations_app.preflight import run_preflight

MIB = 1048576


def _stats(elapsed_ms, mib, rate_mibs, downtime=150):
    return {
        "time_elapsed": elapsed_ms,
        "memory_processed": mib * MIB,
        "data_processed": mib * MIB,
        "memory_bps": rate_mibs * MIB,
        "downtime": downtime,
    }


def test_it_takes_the_fixed_cost_as_elapsed_time_minus_the_transfer():
    # 100 MiB at QEMU's 100 MiB/s is 1 s of a 1.5 s job: 0.5 s is fixed.
    assert prediction.cost_sample(_stats(1500, 100, 100)) == (1500, 100 * MIB, 500, 100.0 * MIB)
    assert prediction.cost_sample(_stats(900, 100, 100))[2] == 0  # never negative
    assert prediction.cost_sample({"time_elapsed": 1000, "memory_processed": MIB}) is None  # no rate


def test_it_learns_the_median_of_the_last_ten_jobs_per_host_pair(make_job):
    now = timezone.now()
    for i in range(12):
        job = make_job(status=MigrationJob.SUCCEEDED, vm_name=f"vm{i}", started_at=now, finished_at=now)
        # The two oldest (huge fixed cost, 900 ms downtime) fall out of the window of ten.
        fixed = 5000 if i < 2 else 400 + 10 * i
        row = prediction.record(job, _stats(1000 + fixed, 100, 100, downtime=900 if i < 2 else 100 + i), 90.0)
        MigrationCostSample.objects.filter(pk=row.pk).update(created_at=now + timedelta(seconds=i))
    capped = make_job(status=MigrationJob.SUCCEEDED, vm_name="capped", options={"bandwidth": 4})
    row = prediction.record(capped, _stats(26000, 100, 4, downtime=140), None)  # capped: no link sample
    MigrationCostSample.objects.filter(pk=row.pk).update(created_at=now + timedelta(seconds=20))
    learned = prediction.learned(capped.source, capped.target)
    # fixed: the capped job's 1000 ms and jobs 3..11 (430..510 ms); median of ten.
    assert learned["samples"] == 10 and learned["fixed_s"] == 0.475
    assert learned["downtime_floor_ms"] == 108  # 140 and 103..111: median 107.5, rounded
    assert learned["transfer_mibs"] == 100.0  # the capped job's 4 MiB/s says nothing about the link
    assert prediction.learned(capped.target, capped.source)["samples"] == 0  # per direction
    # Idempotent (reconcile may conclude twice); storage copies are not counted.
    assert prediction.record(capped, _stats(26000, 100, 4), None).pk == row.pk
    copy = make_job(status=MigrationJob.SUCCEEDED, mode="live-copy", vm_name="copy")
    assert prediction.record(copy, _stats(9000, 100, 100), 80.0) is None
    assert MigrationCostSample.objects.count() == 13


def test_it_adds_the_learned_fixed_cost_and_downtime_floor_to_the_preflight_estimate(
    transactional_db, node_xml
):
    a = Host.objects.create(name="t-a", uri=f"test://{node_xml('a')}")
    b = Host.objects.create(name="t-b", uri=f"test://{node_xml('b')}")
    vm = VM.objects.create(uuid="11111111-2222-3333-4444-555555555501", name="web1", host=a, state=VM.RUNNING)

    def estimate():
        report = run_preflight(MigrationPlan(vm=vm, source=a, target=b, mode="live"))
        return next(r for r in report.results if r.id == "prediction").details

    before = estimate()
    assert before["learned_samples"] == 0 and before["estimated_downtime_ms"] < 200
    for i in range(3):
        MigrationCostSample.objects.create(
            source=a, target=b, elapsed_ms=2000, data_bytes=MIB, fixed_ms=700 + 100 * i, downtime_ms=250
        )
    after = estimate()  # checks run in worker threads: the rows must be committed
    assert after["fixed_seconds"] == 0.8 and after["downtime_floor_ms"] == 250
    assert after["estimated_seconds"] == round(before["estimated_seconds"] + 0.8, 2)
    assert after["estimated_downtime_ms"] == 250


def test_it_learns_how_much_of_a_vms_resident_memory_is_not_guest_data(make_job):
    # The preflight counted 72 MiB (QEMU's resident memory); the job moved 34 MiB.
    report = {"results": [{"id": "prediction", "details": {"memory_to_send_mib": 72}}]}
    job = make_job(status=MigrationJob.SUCCEEDED, preflight=report)
    row = prediction.record(job, _stats(2000, 34, 100), 90.0)
    assert row.vm_id == job.vm_id and row.overhead_mib == 38.0
    details = {}
    assert prediction.memory_to_send(80 * MIB, job.vm, details) == 42 * MIB
    assert details == {"memory_resident_mib": 80, "memory_overhead_mib": 38.0, "memory_to_send_mib": 42}
    # A report that already had a correction: the resident figure is what counts.
    report["results"][0]["details"].update(memory_resident_mib=70, memory_to_send_mib=32)
    assert prediction.counted_memory_mib(report) == 70.0
    other = make_job(status=MigrationJob.SUCCEEDED, vm_name="fresh")
    assert prediction.memory_to_send(80 * MIB, other.vm, {}) == 80 * MIB  # nothing learned yet
