"""The states of a migration job and the transitions allowed between them.

This table is the single source: the model's predicates, the one-active-job constraint,
reconcile's stale scan and lifecycle.transition() (the only writer of a job's status) all
read it. docs/architecture.md draws it.

    pending_approval -> queued | rejected | cancelled
    queued           -> preflight | cancelled
    preflight        -> running | cancelling | failed | needs_reconcile
    running          -> cancelling | succeeded | failed | cancelled | needs_reconcile
    cancelling       -> succeeded | failed | cancelled | needs_reconcile
    needs_reconcile  -> running (reconcile re-attached) | succeeded | failed | cancelled
    succeeded, failed, cancelled, rejected: final
"""

PENDING_APPROVAL = "pending_approval"
QUEUED = "queued"
PREFLIGHT = "preflight"
RUNNING = "running"
CANCELLING = "cancelling"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
REJECTED = "rejected"
NEEDS_RECONCILE = "needs_reconcile"

# The phase (not a status) of a running batch child whose VM has landed on the target
# while its worker concludes it beside the next child's start (jobrun.conclude_success):
# its migration stream is over, so it fills no slot of a batch's limits (fleet/limits.py).
LANDED = "landed"

ALL = (
    PENDING_APPROVAL,
    QUEUED,
    PREFLIGHT,
    RUNNING,
    CANCELLING,
    SUCCEEDED,
    FAILED,
    CANCELLED,
    REJECTED,
    NEEDS_RECONCILE,
)

TRANSITIONS = {
    PENDING_APPROVAL: {QUEUED, REJECTED, CANCELLED},
    QUEUED: {PREFLIGHT, CANCELLED},
    PREFLIGHT: {RUNNING, CANCELLING, FAILED, NEEDS_RECONCILE},
    RUNNING: {CANCELLING, SUCCEEDED, FAILED, CANCELLED, NEEDS_RECONCILE},
    CANCELLING: {SUCCEEDED, FAILED, CANCELLED, NEEDS_RECONCILE},
    NEEDS_RECONCILE: {RUNNING, SUCCEEDED, FAILED, CANCELLED},
    SUCCEEDED: set(),
    FAILED: set(),
    CANCELLED: set(),
    REJECTED: set(),
}

FINAL = tuple(s for s in ALL if not TRANSITIONS[s])
ACTIVE = tuple(s for s in ALL if TRANSITIONS[s])
# A worker (or reconcile) holds the job and must heartbeat; a stale one needs reconcile.
WORKING = tuple(s for s in ACTIVE if NEEDS_RECONCILE in TRANSITIONS[s])
# Cancel acts at once before a worker holds the job, through the worker after.
CANCEL_AT_ONCE = tuple(
    s for s in ACTIVE if CANCELLED in TRANSITIONS[s] and s not in WORKING + (NEEDS_RECONCILE,)
)
CANCEL_THROUGH_WORKER = tuple(s for s in WORKING if CANCELLING in TRANSITIONS[s])


def sources_of(target):
    """The states from which a job may move to ``target``."""
    return tuple(s for s in ALL if target in TRANSITIONS[s])
