"""The convergence ladder: an optional per-job policy, like oVirt's convergence schedules.

While a live job is "not converging" (the verdict of jobrun.Convergence), the ladder raises
the allowed downtime in steps (``virsh migrate-setmaxdowntime``); when the highest step
still does not converge, it switches to post-copy (``virsh migrate-postcopy``,
``ladder-postcopy``) or aborts (``virsh domjobabort``, ``ladder-abort``: the VM keeps running
on the source). ``ladder`` alone stops at the highest step and leaves the decision to the
user. A step is taken when the job became "not converging", and then again each time it
stayed so for STEP_PASSES more memory passes or ``ladder_step_seconds`` seconds since the
previous step, whichever comes first.

``Ladder.decide`` is a pure function of the samples it is fed (time, pass, verdict, the
downtime in effect): it returns the action to take and keeps no handle on libvirt, so the
decisions are tested without a host. modes/live.py applies the actions.
"""

from dataclasses import dataclass

DEFAULT_MAX_DOWNTIME_MS = 1000
DEFAULT_STEPS = 3
DEFAULT_STEP_SECONDS = 10
STEP_PASSES = 3
QEMU_DEFAULT_DOWNTIME_MS = 300


@dataclass(frozen=True)
class Action:
    """One ladder decision: ``kind`` is "downtime" (``ms``, ``step`` of ``steps``),
    "postcopy" or "abort"."""

    kind: str
    ms: int = 0
    step: int = 0
    steps: int = 0

    def mark(self):
        """The chart's label for this step."""
        if self.kind == "downtime":
            return f"{self.ms} ms"
        return self.kind


def downtime_steps(start_ms, max_ms, steps):
    """The downtimes of the ladder, geometric from above ``start_ms`` up to ``max_ms``
    (rounded to 10 ms, strictly increasing). Empty when ``max_ms`` is not above the start."""
    start_ms = max(1, start_ms)
    if max_ms <= start_ms:
        return []
    out = []
    for i in range(1, steps + 1):
        value = max_ms if i == steps else round(start_ms * (max_ms / start_ms) ** (i / steps), -1)
        value = int(min(max_ms, value))
        if value > start_ms and (not out or value > out[-1]):
            out.append(value)
    return out


class Ladder:
    """The ladder of one job run. ``policy`` is the job's ``convergence_policy`` option."""

    def __init__(self, options, start_downtime_ms=None):
        options = options or {}
        self.policy = options.get("convergence_policy") or "none"
        self.postcopy_enabled = bool(options.get("postcopy"))
        self.step_seconds = options.get("ladder_step_seconds") or DEFAULT_STEP_SECONDS
        start = start_downtime_ms or QEMU_DEFAULT_DOWNTIME_MS
        self.steps = downtime_steps(
            start,
            options.get("ladder_max_downtime") or DEFAULT_MAX_DOWNTIME_MS,
            options.get("ladder_steps") or DEFAULT_STEPS,
        )
        self.taken = 0  # downtime steps taken
        self.since = None  # (t, iteration) of the last step, or of the verdict
        self.last_ms = None  # the downtime the ladder set last
        self.final = None  # the final action, once taken

    @property
    def active(self):
        return self.policy != "none" and self.final is None

    def _due(self, t, iteration):
        if self.since is None:
            return True  # the verdict itself already waited several passes
        t0, i0 = self.since
        return t - t0 >= self.step_seconds or iteration - i0 >= STEP_PASSES

    def decide(self, t, iteration, converging, downtime_ms):
        """The action for one progress sample (seconds since the start, memory pass,
        verdict, the downtime in effect now), or None."""
        if not self.active:
            return None
        if converging:
            return None
        current = downtime_ms or QEMU_DEFAULT_DOWNTIME_MS
        if self.last_ms is not None and current != self.last_ms:
            # Someone changed the downtime by hand since the last step: that counts as a
            # step, and gets its own time to work before the ladder goes on from it.
            self.since, self.last_ms = (t, iteration), current
            return None
        if not self._due(t, iteration):
            return None
        self.since = (t, iteration)
        # A downtime the user raised by hand counts: the ladder goes on from above it.
        higher = [ms for ms in self.steps if ms > current]
        if higher:
            self.taken = len(self.steps) - len(higher) + 1
            self.last_ms = higher[0]
            return Action("downtime", higher[0], self.taken, len(self.steps))
        if self.policy == "ladder-postcopy" and self.postcopy_enabled:
            self.final = Action("postcopy")
            return self.final
        if self.policy in ("ladder-abort", "ladder-postcopy"):
            self.final = Action("abort")
            return self.final
        self.final = Action("top")  # plain ladder: stays at the highest step
        return None

    def plan_lines(self, src, name):
        """virsh equivalents of the policy, for the plan's command lines."""
        if self.policy == "none":
            return []
        ladder = ", ".join(f"{ms}" for ms in self.steps) or "-"
        lines = [
            f"# convergence policy {self.policy}: while not converging, every {self.step_seconds} s or "
            f"{STEP_PASSES} passes: virsh -c {src} migrate-setmaxdowntime {name} MS (MS = {ladder})"
        ]
        if self.policy == "ladder-postcopy" and self.postcopy_enabled:
            lines.append(f"# then: virsh -c {src} migrate-postcopy {name}")
        elif self.policy != "ladder":
            lines.append(f"# then: virsh -c {src} domjobabort {name}")
        return lines
