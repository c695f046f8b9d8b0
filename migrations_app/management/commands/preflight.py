"""`manage.py preflight VM TARGET --mode live|live-copy|cold|offline [--json]`

Runs the same checklist as the wizard. Exit status: 0 when nothing fails (warnings
allowed), 1 when a check fails, 2 for bad arguments (unknown VM or host, bad mode or
options). VM and TARGET are names (or a VM UUID / host URI). --json prints
Report.to_dict() (shape documented in docs/preflight.md).
"""

import json
import sys

from django.core.management.base import BaseCommand, CommandError

from hosts.models import VM, Host
from migrations_app import preflight
from migrations_app.plan import MODES, MigrationPlan, PlanError

MARKS = {"pass": "✓", "warn": "!", "fail": "✗", "skip": "-"}


def BadArguments(message):  # noqa: N802 (reads like the exception it builds)
    """A CommandError that exits with status 2 (bad arguments)."""
    return CommandError(message, returncode=2)


def _find_vm(text):
    qs = VM.objects.filter(gone=False).select_related("host")
    matches = list(qs.filter(name=text))
    if not matches:
        try:
            matches = list(qs.filter(uuid=text))
        except Exception:  # not a UUID
            matches = []
    if not matches:
        raise BadArguments(f"No VM named {text!r} in the inventory (sync the hosts first?).")
    if len(matches) > 1:
        hosts = ", ".join(vm.host.name if vm.host else "?" for vm in matches)
        raise BadArguments(f"{len(matches)} VMs are named {text!r} (on {hosts}); give its UUID instead.")
    return matches[0]


def _find_host(text):
    host = Host.objects.filter(name=text).first() or Host.objects.filter(uri=text).first()
    if host is None:
        raise BadArguments(f"No host named {text!r} is registered.")
    return host


class Command(BaseCommand):
    help = "Run the migration preflight checklist for VM -> TARGET without migrating."

    def add_arguments(self, parser):
        parser.add_argument("vm", help="VM name or UUID")
        parser.add_argument("target", help="target host name or URI")
        parser.add_argument("--mode", default="live", help=f"one of: {', '.join(MODES)} (default live)")
        parser.add_argument("--json", action="store_true", help="print the report as JSON")
        parser.add_argument("--margin", type=int, default=None, help="free-memory margin on the target, MiB")
        parser.add_argument("--bandwidth", type=int, default=None, help="bandwidth cap, MiB/s")
        parser.add_argument("--max-downtime", type=int, default=None, help="max downtime, ms")
        parser.add_argument(
            "--option",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="any plan option (e.g. postcopy=1, undefine_source=0); repeatable",
        )
        parser.add_argument("--quick", action="store_true", help="skip the dirty-rate measurement")

    def handle(self, *args, **opts):
        if opts["mode"] not in MODES:
            raise BadArguments(f"--mode must be one of: {', '.join(MODES)}")
        options = {}
        for item in opts["option"]:
            if "=" not in item:
                raise BadArguments(f"--option needs KEY=VALUE, got {item!r}")
            key, value = item.split("=", 1)
            options[key.strip()] = value.strip()
        if opts["bandwidth"] is not None:
            options["bandwidth"] = opts["bandwidth"]
        if opts["max_downtime"] is not None:
            options["max_downtime"] = opts["max_downtime"]
        vm = _find_vm(opts["vm"])
        target = _find_host(opts["target"])
        if vm.host is None:
            raise BadArguments(f"{vm.name} is not on any known host.")
        try:
            plan = MigrationPlan.for_vm(vm, target, opts["mode"], options)
            plan.validate_options()  # the same refusals as migrate_vm and the wizard: exit 2
        except PlanError as exc:
            raise BadArguments(str(exc)) from None
        # Looked up at call time, so a test that replaces it is not remembered by this module.
        report = preflight.run_preflight(
            plan, memory_margin_mib=opts["margin"], measure_dirty_rate=not opts["quick"]
        )
        if opts["json"]:
            self.stdout.write(json.dumps(report.to_dict(), indent=2, default=str))
        else:
            self._print(report, plan)
        if report.verdict == "fail":
            sys.exit(1)

    def _print(self, report, plan):
        w = self.stdout.write
        w(f"Preflight: {plan.vm.name} {plan.source.name} -> {plan.target.name} ({plan.mode})")
        for line in plan.virsh_command().splitlines():
            w(f"  {line}")
        w("")
        for r in report.results:
            w(f"[{MARKS.get(r.status, '?')}] {r.status:4}  {r.title}: {r.message}")
            if r.remedy and r.status in ("warn", "fail"):
                w(f"             fix: {r.remedy}")
        c = report.counts
        w("")
        w(
            f"Verdict: {report.verdict.upper()} ({c['pass']} pass, {c['warn']} warn, {c['fail']} fail, "
            f"{c['skip']} skip) in {report.duration_ms} ms"
        )
