"""The lines of a job's event log, as codes with parameters.

A worker writes ``services.log_event(job, CODE, **params)``; the row keeps the code, the
parameters and the English text. Pages render ``JobEvent.text``, which formats the code's
template in the viewer's language, so a job started by a Chinese-speaking user and run by
an English worker reads in one language for each viewer. A code missing here (older rows)
falls back to the stored text.

Adding a line: add its code and template below, run `make messages`, translate it.
"""

from django.utils.translation import gettext_lazy as _

CATALOG = {
    "picked_up": _("Picked up by worker %(worker)s."),
    "new_warning": _("New warning since the request: %(title)s: %(message)s"),
    "preflight_passed": _("Preflight passed again on the worker."),
    "preflight_passed_here": _("Preflight passed (the checklist migrate_vm ran just before the request)."),
    "preflight_at_request": _("Preflight passed with the request, %(age)s s ago: not run twice in a row."),
    "migration_started": _("Migration started: %(virsh)s"),
    "phase": _("Phase: %(phase)s."),
    # Collapsed: one line per job, updated in place with the latest pass.
    "memory_pass": _("Memory pass %(iteration)d (pages dirtied during the last pass are resent)."),
    "not_converging": _(
        "Not converging: %(remaining)s MiB still to send, but at %(rate)s MiB/s only %(fits)s MiB fit in "
        "the allowed downtime of %(downtime)d ms. Raise the bandwidth, raise the maximum downtime, switch "
        "to post-copy, or cancel."
    ),
    "not_converging_stalled": _(
        "Not converging: the remaining data (%(remaining)s MiB) has not shrunk for several passes, and at "
        "%(rate)s MiB/s only %(fits)s MiB fit in the allowed downtime of %(downtime)d ms. Raise the "
        "bandwidth, raise the maximum downtime, switch to post-copy, or cancel."
    ),
    "converging_again": _("Converging again: what remains fits in the allowed downtime."),
    "policy_downtime": _(
        "Convergence policy: maximum downtime raised to %(ms)d ms (step %(step)d of %(steps)d)."
    ),
    "policy_postcopy": _("Convergence policy: switching to post-copy."),
    "policy_abort": _("Convergence policy: still not converging at the last step; aborting."),
    "shutdown_asked": _("Asking the guest to shut down (waiting up to %(timeout)s s)."),
    "shut_down": _("The guest shut down."),
    "forcing_off": _("The guest did not shut down within %(timeout)s s: forcing it off."),
    "forced_off_now": _("Forced off now, as %(user)s asked."),
    "force_off_asked": _("%(user)s asked to force the guest off now."),
    "storage_shared": _("Disks are on proved shared storage: moving the definition (offline migration)."),
    "storage_copy": _("Disks are not on storage %(target)s shares: copying them."),
    "volume_created": _("Created the empty volume %(path)s on %(host)s for the copy."),
    "copying_disk": _("Copying %(path)s (%(mib)s MiB) to %(host)s."),
    "copied_disk": _("Copied %(path)s."),
    "defined": _("Defined the VM on %(host)s."),
    "undefined": _("Removed the definition from %(host)s."),
    "removed_disks": _("Removed the source disks on %(host)s: %(paths)s."),
    "left_copy": _("The source disk %(path)s stays on %(host)s as a copy of the data at this move."),
    "started": _("Started the VM on %(host)s."),
    "verified": _("Verified: the VM is %(state)s on %(host)s."),
    "offline_move": _("Offline migration: %(virsh)s"),
    "resume": _("Resuming from the journal after the worker stopped (last step: %(step)s)."),
    "rollback": _("Rolling back from the journal (last step: %(step)s)."),
    "rolled_back_volume": _("Removed the volume %(path)s this job had created on %(host)s."),
    "restarted_source": _("Started the VM again on %(host)s."),
    "stats_unreadable": _("Could not read the completed-job statistics: %(error)s"),
    "sync_failed": _("Inventory sync of %(host)s failed: %(error)s"),
    "definition_left": _("A definition of the VM is still on %(host)s (%(state)s)."),
    "shutdown_request_failed": _("The shutdown request failed: %(error)s"),
    "completed_per_libvirt": _("libvirt says the VM is %(state)s on %(host)s: the migration completed."),
    "timeout_postcopy": _("Completion timeout (%(timeout)s s) reached: switching to post-copy."),
    "timeout_abort": _("Completion timeout (%(timeout)s s) reached: aborting the migration."),
    "control_failed": _("%(what)s failed: %(error)s"),
    "aborting": _("Aborting the migration (cancel)."),
    "cancel_ended_with": _("The cancelled migration ended with libvirt's error: %(error)s"),
    "bandwidth_now": _("Bandwidth now %(mibs)s MiB/s."),
    "bandwidth_unlimited": _("Bandwidth now unlimited."),
    "downtime_now": _("Maximum downtime now %(ms)s ms."),
    "postcopy_now": _("Switched to post-copy: the VM now runs on the target while memory follows."),
    "error_but_moved": _("The migrate call reported an error (%(error)s) but the VM runs on the target."),
    "target_pools_ready": _("Target volumes: an active pool at each disk's directory will hold the copies."),
    "remove_disks_failed": _("Removing the source disks failed: %(error)s"),
    "succeeded": _("Succeeded: the VM is on %(host)s."),
    "succeeded_figures": _(
        "Succeeded: the VM is on %(host)s (downtime %(downtime)s ms, total %(total)s s, %(moved)s MiB moved)."
    ),
    "succeeded_total": _("Succeeded: the VM is on %(host)s (total %(total)s s)."),
    "heartbeat_stopped": _(
        "The worker's heartbeat stopped (last at %(at)s); asking libvirt what really happened."
    ),
    "reattached": _("libvirt is still migrating the VM: re-attached, monitoring it again."),
    "retry_reattach": _("Cannot reach the source host to re-attach; will retry."),
    "retry_where": _("Cannot reach %(host)s to find out where the VM is; will retry."),
    "migrate_not_returned": _(
        "The migrate call has not returned yet; concluding from where libvirt shows the VM."
    ),
    # Windows of single jobs (migrations_app/windows.py).
    "waiting": _("Waiting: %(reason)s"),
    "released": _("Its time came: queued for a worker."),
    "missed_window": _("Missed its window: not started by %(at)s. The VM was not touched."),
    # Sentences of a job's error (MigrationJob.error_parts), joined in the viewer's language.
    "err_shutdown_timeout": _(
        "The guest did not shut down within %(timeout)s s and forcing it off was not allowed."
    ),
    "err_cancelled_shutdown": _("Cancelled during the shutdown."),
    "err_cancelled_copy": _("Cancelled during the disk copy."),
    "err_cancelled_before_start": _("Cancelled before it started; the VM was not touched."),
    "err_cold_failed": _("The cold migration failed: %(error)s."),
    "err_worker_stopped": _("The worker stopped during the job (last step: %(step)s)."),
    "err_untouched": _("The VM was not touched."),
    "err_nothing_undone": _("Nothing had to be undone."),
    "err_rolled_back": _("Rolled back:"),
    "err_where_neither": _("The VM is on neither %(source)s nor %(target)s."),
    "err_where_running": _("The VM is running on %(host)s."),
    "err_where_start_failed": _(
        "Starting it again on %(host)s failed: %(error)s. It is shut off on %(host)s."
    ),
    "err_where_still": _("The VM is still %(state)s on %(host)s."),
    "err_where_not_found": _("The VM was not found on %(host)s."),
    # Where the VM is, as the end of a sentence (a nested param: {"code": ..., "params": ...}).
    "err_place_still": _("the VM is still %(state)s on %(host)s"),
    "err_place_not_found": _("the VM was not found on %(host)s"),
    # Live modes (migrations_app/modes/live.py, live_copy.py).
    "err_cancelled_place": _("Cancelled; %(place)s."),
    "err_cancelled_where": _("Cancelled; the VM is %(state)s on %(host)s."),
    "err_live_not_completed": _(
        "The worker stopped during the job and libvirt did not complete the migration; the VM is "
        "%(state)s on %(host)s. Nothing was retried."
    ),
    "err_live_both": _(
        "The VM is %(src_state)s on %(source)s and %(dst_state)s on %(target)s: check which copy is the "
        "real one before starting anything."
    ),
    "err_source_unreachable": _("Cannot reach the source host %(host)s: %(error)s"),
    "err_lost_contact_reattach": _("Lost contact with %(host)s while re-attaching: %(error)s"),
    "err_migrate_no_return": _(
        "The migrate call did not return and the target does not report the VM; check %(host)s."
    ),
    "err_timeout_aborted": _(
        "The migration did not complete within the completion timeout and was aborted; the VM is still "
        "running on %(host)s."
    ),
    "err_policy_aborted": _(
        "The convergence policy aborted the migration: it did not converge even at %(ms)s ms of allowed "
        "downtime; %(place)s."
    ),
    "err_target_gone": _("The target host's libvirtd went away during the migration; %(place)s."),
    "err_source_stopped": _(
        "The source host %(host)s stopped answering during the migration (%(error)s); check it before "
        "retrying."
    ),
    "err_migration_failed": _("The migration failed: %(error)s."),
    "err_no_target_pool": _(
        "%(target)s has no storage pool at %(dir)s, so the disk %(path)s cannot be created there. Define "
        "and start a directory pool at that path on %(target)s. The VM is still on %(source)s."
    ),
    "err_target_volumes": _("Cannot prepare the target volumes on %(host)s: %(error)s"),
    # The runner, reconcile and the checks after a move (runner.py, reconcile.py, jobrun.py).
    "err_host_removed_before": _("The source or target host was removed from kvmweb before the job started."),
    "err_preflight_blocks": _(
        "The preflight checklist now blocks this migration (checked again right before starting): "
        "%(checks)s. Nothing was changed; the VM is still on %(host)s."
    ),
    "err_cancelled_before_migration": _(
        "Cancelled before the migration started; the VM was not touched and is on %(host)s."
    ),
    "err_internal": _("Internal error in the worker: %(error)s"),
    "err_host_removed_reconcile": _("A host of this job was removed; cannot reconcile."),
    "err_verify_missing": _("Verification failed: %(host)s does not report the VM after the move."),
    "err_verify_not_running": _(
        "Verification failed: the VM is %(state)s (%(reason)s) on %(host)s, not running."
    ),
    # Cold mode before and around the move (migrations_app/modes/cold.py).
    "err_cold_unreachable": _("Cannot reach a host: %(error)s. Nothing was changed; the VM is on %(host)s."),
    "err_not_on_source": _("The VM is not on %(host)s any more. Nothing was changed."),
    "err_not_in_pool": _("The disk %(path)s is not in a storage pool on %(host)s, so it cannot be copied."),
    "err_copy_failed": _("Copying the disk %(path)s failed: %(error)s."),
    "err_defined_both": _(
        "The VM is defined on %(target)s but %(state)s on %(source)s: check which copy is the real one "
        "before starting anything. Nothing else was changed."
    ),
    "err_start_on_target_failed": _(
        "The VM was moved to %(target)s, but starting it there failed: %(error)s. It is defined and shut "
        "off on %(target)s, no longer on %(source)s."
    ),
}


# Codes kept as one line per job: a new line of the code replaces the older one.
COLLAPSING = {"memory_pass"}


# VM states as error sentences name them (rendered in the viewer's language).
STATE_WORDS = {"running": _("running"), "paused": _("paused"), "shut off": _("shut off")}


def parts(*items):
    """Sentences of a job's error as stored in MigrationJob.error_parts: each item a
    (code, params) pair or a plain (English) string; each keeps its English text."""
    from django.utils import translation

    out = []
    with translation.override("en"):
        for item in items:
            if isinstance(item, dict):
                out.append(item)
            elif isinstance(item, tuple):
                code, params = item
                out.append({"code": code, "params": params, "en": render(code, params, code)})
            elif item:
                out.append({"code": "", "params": {}, "en": str(item)})
    return out


def english(error_parts):
    """The stored English text of error sentences."""
    return " ".join(p["en"] for p in error_parts)


def render(code, params, fallback=""):
    """The line for ``code`` in the active language, or ``fallback``."""
    template = CATALOG.get(code)
    if template is None:
        return fallback
    params = dict(params or {})
    for key, value in params.items():
        if (key == "state" or key.endswith("_state")) and value in STATE_WORDS:
            params[key] = str(STATE_WORDS[value])
        elif isinstance(value, dict) and "code" in value:
            # A nested sentence part (where the VM is), in the same language.
            params[key] = render(value["code"], value.get("params"), value.get("en", ""))
    try:
        return str(template) % params
    except (KeyError, TypeError, ValueError):
        return fallback
