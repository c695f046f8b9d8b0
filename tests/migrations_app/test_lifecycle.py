"""The job lifecycle: one table of allowed transitions, one function that applies it."""

import pytest

from kvmweb.audit.models import AuditEvent
from migrations_app import states
from migrations_app.lifecycle import IllegalTransition, transition
from migrations_app.models import JobEvent, MigrationJob


def test_it_refuses_every_transition_the_table_does_not_allow(make_job):
    checked = 0
    for source in states.ALL:
        job = make_job(status=source)
        for target in states.ALL:
            if target in states.TRANSITIONS[source]:
                continue
            # Asked from "wherever the table allows": the row is not there, nothing moves
            # (an initial state such as pending_approval is reached from nowhere at all).
            if states.sources_of(target):
                assert transition(job.pk, target) is False, f"{source} -> {target}"
            else:
                with pytest.raises(IllegalTransition):
                    transition(job.pk, target)
            job.refresh_from_db()
            assert job.status == source
            # Asked explicitly from this state: a programming error, refused loudly.
            with pytest.raises(IllegalTransition):
                transition(job.pk, target, from_=[source])
            checked += 1
        job.status = states.FAILED  # free the one-active-job slot for the next VM row
        MigrationJob.objects.filter(pk=job.pk).update(status=states.FAILED)
    assert checked == sum(len(states.ALL) - len(states.TRANSITIONS[s]) for s in states.ALL)


def test_it_applies_every_allowed_transition_with_its_line_audit_and_sequence(make_job):
    for source in states.ALL:
        for target in sorted(states.TRANSITIONS[source]):
            job = make_job(status=source)
            seq = job.progress_seq
            assert transition(job.pk, target, event=f"{source} to {target}", audit="migration.test") is True
            job.refresh_from_db()
            assert job.status == target and job.progress_seq > seq
            assert JobEvent.objects.filter(job=job, message=f"{source} to {target}").exists()
            audit = AuditEvent.objects.filter(action="migration.test", target_id=str(job.pk)).get()
            assert audit.details["status"] == target
            assert (job.finished_at is not None) == (target in states.FINAL)
            MigrationJob.objects.filter(pk=job.pk).update(status=states.FAILED)


def test_it_lets_one_of_two_racing_transitions_win(make_job):
    job = make_job(status=states.QUEUED)
    assert transition(job.pk, states.PREFLIGHT, from_=[states.QUEUED]) is True
    assert transition(job.pk, states.PREFLIGHT, from_=[states.QUEUED]) is False  # the redelivered task
    assert transition(job.pk, states.CANCELLED, from_=states.CANCEL_AT_ONCE) is False


def test_it_keeps_the_claim_a_single_table_update_so_postgresql_rechecks_it(make_job):
    # A join (source__group) would become UPDATE ... WHERE id IN (SELECT ...), which
    # PostgreSQL does not re-check after a concurrent claim: two workers both won.
    from django.db.models import Q

    from migrations_app.windows import claim_condition

    job = make_job(status=states.QUEUED)
    with pytest.raises(ValueError):
        transition(job.pk, states.PREFLIGHT, from_=[states.QUEUED], where=Q(source__name="x"))
    assert transition(job.pk, states.PREFLIGHT, from_=[states.QUEUED], where=claim_condition(job.created_at))


def test_it_derives_the_model_and_the_constraint_from_the_table():
    assert set(MigrationJob.ACTIVE_STATES) == {s for s in states.ALL if states.TRANSITIONS[s]}
    assert set(MigrationJob.FINAL_STATES) == {s for s in states.ALL if not states.TRANSITIONS[s]}
    (constraint,) = MigrationJob._meta.constraints
    assert set(dict(constraint.condition.children)["status__in"]) == set(states.ACTIVE)
