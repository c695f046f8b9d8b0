"""The result of one check and of a whole checklist run, as stored with a job (JSON)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from django.utils.translation import gettext as _

PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"
STATUSES = (PASS, WARN, FAIL, SKIP)


@dataclass
class CheckResult:
    """The outcome of one check. ``details`` holds the raw facts that were checked."""

    id: str
    title: str
    status: str
    message: str
    remedy: str = ""
    details: dict = field(default_factory=dict)
    overridable: bool = False

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, data):
        keys = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in keys})


@dataclass
class Report:
    """A whole checklist run: results in display order, the overall verdict (the worst
    status; skip counts as pass), when it started, how long it took, the plan, and the ids
    of the results taken from an earlier run instead of checked again (``reused``)."""

    results: list
    verdict: str
    started_at: str
    duration_ms: int
    plan: dict = field(default_factory=dict)
    reused: list = field(default_factory=list)
    # When the checklist the ``reused`` results were taken from started (a re-check's
    # static results are as old as that one, not as this run): runner.reusable_results.
    reused_from: str = ""
    # In memory only (never in to_dict): the source's facts this run read, for a second
    # look at the same plan moments later (preflight/run.py SOURCE_FACTS).
    facts: dict = field(default_factory=dict, repr=False, compare=False)

    @staticmethod
    def verdict_of(results):
        statuses = {r.status for r in results}
        if FAIL in statuses:
            return FAIL
        if WARN in statuses:
            return WARN
        return PASS

    @property
    def fails(self):
        return [r for r in self.results if r.status == FAIL]

    @property
    def warnings(self):
        return [r for r in self.results if r.status == WARN]

    @property
    def counts(self):
        return {s: sum(1 for r in self.results if r.status == s) for s in STATUSES}

    @property
    def rerun_query(self):
        """The dry-run endpoint's query string for this report's plan (re-run button)."""
        from urllib.parse import urlencode

        plan = self.plan or {}
        if not plan.get("vm", {}).get("id") or not plan.get("target", {}).get("id"):
            return ""
        query = {"vm": plan["vm"]["id"], "target": plan["target"]["id"], "mode": plan.get("mode", "")}
        for key, value in (plan.get("options") or {}).items():
            if value is None or value is False:
                continue
            query[key] = "1" if value is True else value
        return urlencode(query)

    def result(self, check_id):
        return next((r for r in self.results if r.id == check_id), None)

    def blocking_reasons(self, acknowledged_ids=(), overridden_ids=()):
        """Why this report does not allow the migration yet: every fail that is not
        (overridable and overridden), and every warning not acknowledged."""
        acknowledged, overridden = set(acknowledged_ids or ()), set(overridden_ids or ())
        reasons = []
        for r in self.results:
            if r.status == FAIL and not (r.overridable and r.id in overridden):
                reasons.append(f"{r.title}: {r.message}")
            elif r.status == WARN and r.id not in acknowledged:
                reasons.append(
                    _("Not acknowledged: %(title)s: %(message)s") % {"title": r.title, "message": r.message}
                )
        return reasons

    def to_dict(self):
        return {
            "verdict": self.verdict,
            "started_at": self.started_at,
            "duration_ms": self.duration_ms,
            "counts": self.counts,
            "plan": self.plan,
            "results": [r.to_dict() for r in self.results],
            "reused": list(self.reused),
            "reused_from": self.reused_from,
        }

    @classmethod
    def from_dict(cls, data):
        results = [CheckResult.from_dict(r) for r in data.get("results", [])]
        return cls(
            results=results,
            verdict=data.get("verdict") or cls.verdict_of(results),
            started_at=data.get("started_at", ""),
            duration_ms=int(data.get("duration_ms") or 0),
            plan=data.get("plan") or {},
            reused=list(data.get("reused") or []),
            reused_from=data.get("reused_from") or "",
        )
