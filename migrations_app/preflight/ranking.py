"""Ranking the possible targets of a VM for the wizard."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from django.utils import translation

from migrations_app import modes
from migrations_app.plan import MigrationPlan, PlanError
from migrations_app.preflight.checks.prediction import prime_dirty_rate
from migrations_app.preflight.registry import title
from migrations_app.preflight.report import FAIL, CheckResult, Report
from migrations_app.preflight.run import run_preflight


def rank_targets(vm, mode, options=None, user=None, *, measure_dirty_rate=False):
    """Every possible target host for ``vm`` (in the user's scope), with a quick report,
    best first: reachable hosts, then fewest fails, fewest warnings, most free memory. The quick
    variant skips the dirty-rate measurement; for live modes one starts in the background
    (prime_dirty_rate), ready when the chosen target gets the full run."""
    from hosts.models import Host

    if user is None:
        hosts = Host.objects.exclude(pk=vm.host_id)
    else:
        # Only targets this user may pick (a self-service policy's target groups), so the
        # wizard never offers a host that the request would then be refused for.
        from kvmweb.accounts.policy import allowed_targets

        hosts = allowed_targets(user, vm)
    hosts = list(hosts.exclude(maintenance=True))  # never offered as a target
    if not hosts or vm.host is None:
        return []
    if modes.get(mode).live:
        # The person is about to pick a target: measure the dirty rate meanwhile, so the
        # full checklist for the chosen target reuses it instead of waiting a second.
        prime_dirty_rate(vm)

    language = translation.get_language()

    def one(target):
        with translation.override(language):
            return one_in_language(target)

    def one_in_language(target):
        try:
            plan = MigrationPlan(vm=vm, source=vm.host, target=target, mode=mode, options=dict(options or {}))
        except PlanError as exc:
            result = CheckResult("plan", title("plan"), FAIL, str(exc))
            return target, Report([result], FAIL, datetime.now(UTC).isoformat(), 0, {})
        return target, run_preflight(plan, measure_dirty_rate=measure_dirty_rate)

    with ThreadPoolExecutor(max_workers=min(8, len(hosts)), thread_name_prefix="rank") as pool:
        ranked = list(pool.map(one, hosts))

    def key(item):
        host, report = item
        memory = report.result("memory")
        free = (memory.details.get("target_free_mib") or 0) if memory else 0
        connection = report.result("connection")
        unreachable = connection is None or connection.status == FAIL  # its checks were skipped
        return (unreachable, len(report.fails), len(report.warnings), -free, host.name)

    return sorted(ranked, key=key)
