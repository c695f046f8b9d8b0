"""The journal of a cold or offline job: every step with a side effect, written to the
job row before it runs ("started") and after ("done").

Why: a cold move shuts a VM down, copies disks, defines and undefines it on two hosts.
A worker killed between two of those steps must leave nothing half done, so reconcile
reads the journal and finishes the move forward (the VM is already defined on the
target) or rolls it back (volumes this job created are removed, the VM is started again
on the source when it was running), then says exactly what happened.

Steps, in order: begin (the facts the job started from), shutdown, force_off, storage
(the decision: proved shared, or copy), migrate_definition (shared storage), then per disk
create_volume and copy, define, undefine_source, remove_source_disks, start, verify.

Tests stop the worker right after a step by setting KVMWEB_CRASH_AFTER_STEP to the
step's name ("copy" = after it is done, "copy:started" = right after it began).
"""

import os

from django.utils import timezone

from migrations_app.models import MigrationJob

CRASH_ENV = "KVMWEB_CRASH_AFTER_STEP"


class Journal:
    """The steps of one job, kept in ``MigrationJob.journal`` (one writer at a time: the
    worker that claimed the job, or reconcile after it claimed it)."""

    def __init__(self, job_id, entries=None):
        self.job_id = job_id
        self.entries = list(entries or [])

    @classmethod
    def load(cls, job_id):
        entries = MigrationJob.objects.filter(pk=job_id).values_list("journal", flat=True).first()
        return cls(job_id, entries)

    def _write(self, step, state, data):
        self.entries.append({"step": step, "state": state, "at": timezone.now().isoformat(), **data})
        MigrationJob.objects.filter(pk=self.job_id).update(journal=self.entries, heartbeat_at=timezone.now())
        crash = os.environ.get(CRASH_ENV)
        if crash and crash == (step if state == "done" else f"{step}:{state}"):
            os._exit(70)  # test hook: the worker dies right here, as if killed

    def started(self, step, **data):
        self._write(step, "started", data)

    def done(self, step, **data):
        self._write(step, "done", data)

    def find(self, step, state="done", **match):
        """Entries of ``step`` in ``state`` whose data match ``match``."""
        return [
            e
            for e in self.entries
            if e["step"] == step and e["state"] == state and all(e.get(k) == v for k, v in match.items())
        ]

    def has(self, step, state="done", **match):
        return bool(self.find(step, state, **match))

    @property
    def begin(self):
        """The facts the job started from (was_running, start_on_target, ...), or {}."""
        found = self.find("begin")
        return found[0] if found else {}

    @property
    def last_step(self):
        if not self.entries:
            return ""
        last = self.entries[-1]
        return last["step"] if last["state"] == "done" else f"{last['step']} ({last['state']})"

    def created_volumes(self):
        """Target volumes this job began to create (started counts: libvirt may have
        created the file before the worker could write "done")."""
        return [e["path"] for e in self.find("create_volume", "started")]

    @property
    def definition_sent(self):
        """The job began to put the VM's definition on the target."""
        return self.has("define", "started") or self.has("migrate_definition", "started")
