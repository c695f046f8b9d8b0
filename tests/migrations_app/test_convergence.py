"""Convergence you can trust: a stalled migration is called "not converging" (no ETA),
a capped or concurrent job never teaches kvmweb a slower link, and a job with a thousand
passes keeps a small job page."""

from datetime import timedelta

import pytest
from django.utils import timezone, translation

from migrations_app import convergence, jobrun
from migrations_app.lifecycle import write_event
from migrations_app.models import JobEvent, MigrationJob, ProgressSample
from migrations_app.options import PlanError
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


def test_it_learns_the_link_from_a_batch_child_concluded_beside_the_next_ones_start(make_job):
    """A child that landed before this one started streamed nothing beside it, though it
    ended later; the child claimed after this one landed did not either."""
    now = timezone.now()
    stats = {"data_processed": 200 * MIB, "time_elapsed": 2000}
    started, landed = now - timedelta(seconds=2), now - timedelta(seconds=0.1)
    make_job(  # the one before: landed as this one was claimed, concluded 50 ms later
        status=MigrationJob.SUCCEEDED,
        started_at=started - timedelta(seconds=2),
        landed_at=started - timedelta(seconds=0.01),
        finished_at=started + timedelta(seconds=0.05),
        vm_name="before",
    )
    job = make_job(status=MigrationJob.RUNNING, started_at=started, landed_at=landed, vm_name="this")
    make_job(status=MigrationJob.RUNNING, started_at=landed + timedelta(seconds=0.05), vm_name="after")
    assert jobrun.link_sample(job, stats, until=landed) == 100.0
    assert jobrun.link_sample(job, stats) is None  # until now: "after" streams beside it


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


# ---------------------------------------------------------------- the convergence ladder


def _feed(ladder, samples):
    """Feed (t, iteration, converging) samples; returns [(t, action)] for the actions taken,
    applying each downtime step as the worker does."""
    downtime, taken = None, []
    for t, iteration, converging in samples:
        action = ladder.decide(t, iteration, converging, downtime)
        if action is not None:
            taken.append((t, action))
            if action.kind == "downtime":
                downtime = action.ms
    return taken


def _stuck(seconds, per_pass=1.0, start_iteration=4):
    """A never-converging run: one sample a second, a pass every ``per_pass`` seconds."""
    return [(float(t), start_iteration + int(t / per_pass), False) for t in range(seconds)]


def test_it_spaces_the_ladder_downtimes_geometrically_up_to_the_highest():
    assert convergence.downtime_steps(300, 1000, 3) == [450, 670, 1000]
    assert convergence.downtime_steps(100, 500, 5) == [140, 190, 260, 360, 500]
    assert convergence.downtime_steps(300, 300, 3) == []  # nothing above the start
    assert convergence.downtime_steps(995, 1000, 3) == [1000]  # rounded duplicates dropped


def test_it_raises_the_downtime_in_steps_then_aborts():
    ladder = convergence.Ladder(
        {"convergence_policy": "ladder-abort", "ladder_step_seconds": 5, "ladder_max_downtime": 1000}
    )
    taken = _feed(ladder, _stuck(40, per_pass=10))  # slow passes: the seconds decide
    assert [(t, a.kind, a.ms, a.step) for t, a in taken] == [
        (0.0, "downtime", 450, 1),
        (5.0, "downtime", 670, 2),
        (10.0, "downtime", 1000, 3),
        (15.0, "abort", 0, 0),
    ]
    assert ladder.decide(20.0, 9, False, 1000) is None  # over: nothing more


def test_it_takes_the_next_step_after_three_passes_when_they_come_first():
    ladder = convergence.Ladder({"convergence_policy": "ladder-abort", "ladder_step_seconds": 60})
    taken = _feed(ladder, _stuck(12, per_pass=1))  # a pass a second, steps every 60 s
    assert [t for t, _a in taken] == [0.0, 3.0, 6.0, 9.0]
    assert taken[-1][1].kind == "abort"


def test_it_waits_while_converging_and_goes_on_from_a_downtime_raised_by_hand():
    ladder = convergence.Ladder({"convergence_policy": "ladder-postcopy", "postcopy": True})
    assert ladder.decide(0.0, 2, True, None) is None  # converging: nothing to do
    first = ladder.decide(1.0, 3, False, 800)  # the user already raised it to 800 ms
    assert (first.kind, first.ms, first.step) == ("downtime", 1000, 3)
    assert ladder.decide(2.0, 4, False, 1000) is None  # not due yet (3 passes or 10 s)
    assert ladder.decide(11.0, 5, False, 1000).kind == "postcopy"


def test_it_gives_a_downtime_changed_by_hand_its_own_time_before_the_next_step():
    # Review finding: a step to 450 ms, then an operator raises it to 1,500 ms; the next
    # sample (judged on passes from before the raise) must not abort at once.
    ladder = convergence.Ladder({"convergence_policy": "ladder-abort", "ladder_step_seconds": 10})
    assert ladder.decide(10.0, 5, False, 300).ms == 450
    assert ladder.decide(21.0, 9, False, 1500) is None  # the hand-raised value counts as a step
    assert ladder.decide(25.0, 10, False, 1500) is None  # its own 10 s / 3 passes
    assert ladder.decide(31.0, 12, False, 1500).kind == "abort"  # nothing above 1,500 left


def test_it_refuses_a_ladder_whose_top_is_not_above_the_allowed_downtime(make_job):
    job = make_job()
    options = {"convergence_policy": "ladder-abort", "max_downtime": 2000}
    plan = MigrationPlan(job.vm, job.source, job.target, "live", options)
    with translation.override("en"), pytest.raises(PlanError, match="highest downtime"):
        plan.validate_options()
    ok = MigrationPlan(job.vm, job.source, job.target, "live", dict(options, ladder_max_downtime=4000))
    ok.validate_options()


def test_it_ends_a_plain_ladder_at_its_highest_step_and_never_acts_without_a_policy():
    plain = convergence.Ladder({"convergence_policy": "ladder", "ladder_steps": 1})
    taken = _feed(plain, _stuck(60))
    assert [(a.kind, a.ms) for _t, a in taken] == [("downtime", 1000)]
    assert _feed(convergence.Ladder({}), _stuck(60)) == []
    # ladder-postcopy without post-copy enabled (the plan refuses it; reconcile may still
    # meet an old job): abort rather than leave it running.
    no_postcopy = convergence.Ladder({"convergence_policy": "ladder-postcopy", "ladder_steps": 1})
    assert [a.kind for _t, a in _feed(no_postcopy, _stuck(30))] == ["downtime", "abort"]


def test_it_refuses_a_ladder_ending_in_postcopy_without_postcopy_and_shows_the_virsh_lines(make_job):
    job = make_job()
    plan = MigrationPlan(job.vm, job.source, job.target, "live", {"convergence_policy": "ladder-postcopy"})
    with translation.override("en"), pytest.raises(PlanError, match="needs post-copy enabled"):
        plan.validate_options()
    with (
        translation.override("en"),
        pytest.raises(PlanError, match="one of: none, ladder, ladder-postcopy, ladder-abort"),
    ):
        MigrationPlan(job.vm, job.source, job.target, "live", {"convergence_policy": "sometimes"})
    plan = MigrationPlan(job.vm, job.source, job.target, "live", {"convergence_policy": "ladder-abort"})
    lines = plan.virsh_command()
    assert "migrate-setmaxdowntime web1 MS (MS = 450, 670, 1000)" in lines
    assert "domjobabort web1" in lines


def test_it_keeps_ladder_marks_on_a_thinned_chart(make_job):
    job = make_job(status=MigrationJob.RUNNING, started_at=timezone.now())
    ProgressSample.objects.bulk_create(
        ProgressSample(job=job, t=i / 4, rate=MIB, remaining=8 * MIB, mark="670 ms" if i == 1001 else "")
        for i in range(3000)
    )
    samples = job.chart_samples(limit=100)
    assert len(samples) <= 101 and [s["mark"] for s in samples if s["mark"]] == ["670 ms"]
    assert [s["t"] for s in samples] == sorted(s["t"] for s in samples)


def test_it_sends_the_ladder_marks_with_the_chart_history(make_job, login, operator):
    job = make_job(status=MigrationJob.RUNNING, started_at=timezone.now())
    ProgressSample.objects.create(job=job, t=1.0, rate=MIB, remaining=8 * MIB)
    ProgressSample.objects.create(job=job, t=1.25, rate=MIB, remaining=8 * MIB, mark="480 ms")
    page = login(operator).get(f"/migrations/{job.pk}/").content.decode()
    assert '[1.000,1048576,8388608],[1.250,1048576,8388608,"480 ms"]' in page
