"""Convergence you can trust: a stalled migration is called "not converging" (no ETA),
a capped or concurrent job never teaches kvmweb a slower link, and a job with a thousand
passes keeps a small job page."""

from datetime import timedelta

from django.utils import timezone

from migrations_app import jobrun
from migrations_app.lifecycle import write_event
from migrations_app.models import JobEvent, MigrationJob, ProgressSample
from migrations_app.plan import MigrationPlan
from migrations_app.preflight import Context
from migrations_app.preflight.checks.prediction import _link_bandwidth

MIB = 1048576


def _sample(iteration, remaining, rate=MIB, dirty=0):
    return {"iteration": iteration, "memory_remaining": remaining, "rate": rate, "dirty_rate": dirty}


def test_it_calls_a_stalled_migration_not_converging():
    c = jobrun.Convergence()
    verdicts = [c.judge(_sample(i, 8 * MIB), 300)[0] for i in range(1, 7)]
    # Pass 1 is the bulk copy; the remaining 8 MiB never shrink and never fit in
    # 1 MiB/s x 300 ms: from the third pass on, that is a stall.
    assert verdicts[:3] == [True, True, True] and verdicts[-1] is False
    _ok, details = c.judge(_sample(7, 8 * MIB), 300)
    assert details["stalled"] is True and details["fits"] == 0.3 * MIB


def test_it_calls_a_shrinking_or_fitting_migration_converging():
    c = jobrun.Convergence()
    assert all(c.judge(_sample(i, (64 >> i) * MIB), 300)[0] for i in range(1, 7))
    assert jobrun.Convergence().judge(_sample(5, 0.1 * MIB), 300)[0] is True  # fits in the downtime
    # Dirtying faster than it sends, while what remains does not fit: not converging.
    assert jobrun.Convergence().judge(_sample(2, 8 * MIB, dirty=2 * MIB), 300)[0] is False


def test_it_learns_the_link_only_from_uncapped_jobs_that_ran_alone(make_job):
    now = timezone.now()
    stats = {"data_processed": 200 * MIB, "time_elapsed": 2000}
    solo = make_job(status=MigrationJob.SUCCEEDED, started_at=now - timedelta(seconds=2), finished_at=now)
    assert jobrun.link_sample(solo, stats) == 100.0
    capped = make_job(
        status=MigrationJob.SUCCEEDED, options={"bandwidth": 1}, started_at=now, finished_at=now, vm_name="db"
    )
    assert jobrun.link_sample(capped, stats) is None
    later = make_job(status=MigrationJob.RUNNING, started_at=now, vm_name="cache", requested_bandwidth=4)
    assert jobrun.link_sample(later, stats) is None  # capped on the way


def test_it_keeps_the_learned_link_speed_after_a_capped_job(make_job):
    now = timezone.now()
    first = make_job(
        status=MigrationJob.SUCCEEDED, started_at=now, finished_at=now, result={"link_mibs": 900.0}
    )
    plan = MigrationPlan(first.vm, first.source, first.target, "live", {})
    ctx = Context(plan, memory_margin_mib=0, deadline=0)
    assert _link_bandwidth(ctx)[0] == 900.0
    make_job(  # a 1 MiB/s job records no link sample: the link stays what it was
        status=MigrationJob.SUCCEEDED,
        options={"bandwidth": 1},
        finished_at=now,
        vm_name="db",
        result={"link_mibs": None},
    )
    assert _link_bandwidth(ctx)[0] == 900.0


def test_it_keeps_one_pass_line_and_a_small_page_after_a_thousand_passes(make_job, login, operator):
    job = make_job(status=MigrationJob.RUNNING, started_at=timezone.now())
    for iteration in range(2, 1002):
        write_event(job.pk, ("memory_pass", {"iteration": iteration}))
    lines = JobEvent.objects.filter(job=job, code="memory_pass")
    assert [e.params["iteration"] for e in lines] == [1001]
    ProgressSample.objects.bulk_create(
        ProgressSample(job=job, t=i / 4, rate=MIB, remaining=8 * MIB, iteration=i // 4) for i in range(4000)
    )
    page = login(operator).get(f"/migrations/{job.pk}/")
    assert page.status_code == 200
    assert len(page.content) < 100_000, len(page.content)
    assert b"Memory pass 1001" in page.content and b"Memory pass 1000 " not in page.content


def test_it_renders_worker_lines_in_the_viewers_language(make_job, login, operator):
    job = make_job(status=MigrationJob.RUNNING)
    write_event(job.pk, ("shutdown_asked", {"timeout": "30"}))
    event = JobEvent.objects.get(job=job, code="shutdown_asked")
    assert event.message == "Asking the guest to shut down (waiting up to 30 s)."
    client = login(operator)
    client.cookies["django_language"] = "zh-hans"
    page = client.get(f"/migrations/{job.pk}/", HTTP_ACCEPT_LANGUAGE="zh-hans")
    assert "Asking the guest to shut down" not in page.content.decode()
