"""Running the checklist: every registered check concurrently on threads, bounded by
KVMWEB_PREFLIGHT_TIMEOUT; an unreachable or hung host is a fail result with a remedy,
never an exception or a hang."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import UTC, datetime

from django.db import DatabaseError
from django.utils import translation
from django.utils.translation import gettext as _

from hosts import hypervisor
from migrations_app import dirtyrate
from migrations_app.models import LeftCopy
from migrations_app.preflight.context import Context, Unavailable, setting
from migrations_app.preflight.registry import checks, result_for
from migrations_app.preflight.report import FAIL, SKIP, WARN, Report

log = logging.getLogger(__name__)

# Submitted first: the slow one (the dirty-rate measurement) overlaps with everything else.
FIRST = "prediction"


def _left_copies(host):
    """{path: LeftCopy} of the copies kvmweb recorded leaving on ``host``."""
    try:
        return {c.path: c for c in LeftCopy.objects.filter(host=host, removed_at=None)}
    except DatabaseError:  # no database (benchmark, command without migrate)
        return {}


def _run_one(spec, ctx, language=None):
    """Run one check; an Unavailable fact is a skip, a libvirt error a warning that says
    the check could not be done, anything else a failure (logged). Django's active
    language is per thread: the caller's is activated here so messages are in it."""
    with translation.override(language):
        return _run_one_inner(spec, ctx)


def _run_one_inner(spec, ctx):
    check_id = spec.id
    try:
        made = spec.fn(ctx)
        made.id, made.title = check_id, str(spec.title)
        return made
    except Unavailable as exc:
        return result_for(check_id, SKIP, str(exc))
    except hypervisor.HypervisorError as exc:
        return result_for(
            check_id,
            WARN,
            _("Could not check: %(e)s") % {"e": exc.message},
            exc.remedy or _("Re-run the checklist; if it persists, check the host."),
            {"error": exc.message},
        )
    except Exception as exc:  # a bug in a check must not hide the other results
        log.exception("preflight check %s crashed", check_id)
        return result_for(
            check_id,
            FAIL,
            _("The check itself failed: %(e)s") % {"e": exc},
            _("Report this to the kvmweb administrators."),
            {"error": repr(exc)},
            overridable=True,
        )


# Facts of the source's VM that a migration landing on the target does not change: a run
# hands them on in its Report (``facts``, in memory only) to a second look at the same
# plan moments later (runner.after_landing, ``known``).
SOURCE_FACTS = ("domain", "guest")


def run_preflight(
    plan, *, memory_margin_mib=None, measure_dirty_rate=True, timeout=None, reuse=None, known=None
):
    """Run the whole checklist for ``plan`` (a MigrationPlan) and return a Report.

    Checks run concurrently; the run is bounded by ``timeout`` (KVMWEB_PREFLIGHT_TIMEOUT):
    a check still waiting then is a fail. Never raises for host problems.
    ``reuse``: {check id: CheckResult} from an earlier run of the same plan, taken as they
    are instead of running those checks (the worker's re-check, migrations_app/runner.py);
    the facts only they need are then not read at all. ``known``: facts (SOURCE_FACTS)
    an earlier run of the same plan read, taken as they are."""
    reuse = reuse or {}
    if memory_margin_mib is None:
        memory_margin_mib = setting("KVMWEB_PREFLIGHT_MEMORY_MARGIN_MIB", 256)
    timeout = timeout or setting("PREFLIGHT_TIMEOUT", 20.0)
    started = datetime.now(UTC)
    t0 = time.monotonic()
    ctx = Context(
        plan,
        memory_margin_mib=memory_margin_mib,
        deadline=t0 + timeout,
        measure_dirty_rate=measure_dirty_rate,
    )
    ctx.seed(known or {})
    # Database facts are read here, on the caller's thread and connection (the checks
    # run on pool threads with connections of their own).
    ctx.left_copies = _left_copies(plan.target)
    # A measurement younger than a minute, stored by any process, is reused.
    ctx.stored_dirty_rate = dirtyrate.recall(plan.vm.uuid) if measure_dirty_rate else None
    specs = checks()
    order = [spec.id for spec in specs]
    results = {cid: reuse[cid] for cid in order if cid in reuse}
    submit_order = sorted(
        (spec for spec in specs if spec.id not in results), key=lambda spec: spec.id != FIRST
    )
    pool = ThreadPoolExecutor(max_workers=len(specs), thread_name_prefix="preflight")
    try:
        language = translation.get_language()
        futures = {spec.id: pool.submit(_run_one, spec, ctx, language) for spec in submit_order}
        for cid in order:
            if cid not in futures:
                continue
            try:
                results[cid] = futures[cid].result(timeout=max(0.0, ctx.deadline - time.monotonic()))
            except FutureTimeout:
                results[cid] = result_for(
                    cid,
                    FAIL,
                    _("The check did not finish within %(t)g s.") % {"t": timeout},
                    _("A host is slow or hung: check libvirtd on both hosts, then re-run the checklist."),
                    overridable=True,
                )
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        ctx.close()
    facts = ctx.settled(SOURCE_FACTS)
    ordered = [results[cid] for cid in order]
    if measure_dirty_rate and "prediction" not in reuse:  # stored for the next minute's checklists
        dirtyrate.remember(
            plan.vm.uuid, getattr(plan.source, "name", ""), results["prediction"].details.get("dirty_rate")
        )
    try:
        plan_dict = plan.to_dict()
    except Exception:  # a plan that cannot even render flags: still report
        plan_dict = {"mode": plan.mode, "options": plan.options}
    return Report(
        results=ordered,
        verdict=Report.verdict_of(ordered),
        started_at=started.isoformat(timespec="seconds"),
        duration_ms=round((time.monotonic() - t0) * 1000),
        plan=plan_dict,
        reused=[cid for cid in order if cid in reuse],
        facts=facts,
    )
