"""Offline (definition only): a shut-off VM on shared storage; only its definition moves
(virsh migrate --offline --persistent --undefinesource). No disks, no NVRAM, no TPM state
are copied: the preflight refuses what would be lost."""

from django.utils.translation import gettext as _

from hosts import hypervisor as hv
from migrations_app.jobrun import Cancelled, Failed, blocking
from migrations_app.journal import Journal
from migrations_app.modes import Mode, register
from migrations_app.modes.cold import (
    definition_command,
    definition_flags,
    offline_flags,
    reconcile_from_journal,
    settle,
)
from migrations_app.options import PlanError


@register
class Offline(Mode):
    """OFFLINE | PERSIST_DEST (+ UNDEFINE_SOURCE) of a shut-off, persistent VM."""

    key = "offline"
    definition_only = True

    def runs_on_target(self, options):
        return False

    def validate_state(self, vm_name, state, running, persistent):
        if running:
            raise PlanError(
                _(
                    "Offline migration moves only the definition and needs a shut-off VM; "
                    "%(vm)s is %(state)s. Use Live, or Cold (shut down first)."
                )
                % {"vm": vm_name, "state": state}
            )
        if not persistent:
            raise PlanError(_("A transient VM has no definition to move offline."))

    def flag_names(self, options):
        return definition_flags(options)

    def virsh_command(self, plan, src, dst, name):
        return definition_command(src, dst, name, plan.options)

    def run(self, run, plan):
        return run_offline(run, plan)

    def reconcile(self, run):
        return reconcile_from_journal(run)


def run_offline(run, plan):
    """Definition only: OFFLINE + PERSIST_DEST + UNDEFINE_SOURCE of a shut-off VM."""
    job = run.job
    journal = Journal.load(job.pk)
    uuid = str(job.vm.uuid)
    try:
        with hv.session(job.source.uri, call_timeout=60) as src:
            journal.done("begin", was_running=False, start_on_target=False, mode="offline")
            run.event(("offline_move", {"virsh": plan.virsh_command()}))
            journal.started("migrate_definition")
            blocking(
                run,
                lambda: src.migrate(uuid, job.target.uri, offline_flags(plan), dict(plan.params())),
                "offline",
            )
            journal.done("migrate_definition")
    except (hv.HypervisorError, Failed, Cancelled) as exc:
        return settle(run, journal, exc)
    return settle(run, journal)
