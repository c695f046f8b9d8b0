"""Preflight: every reason a migration would fail or hurt, found before it starts.

Each check is a small function ``check_*(ctx)`` registered with its id and title
(``registry.check``) in a file of ``checks/`` by theme. It returns a status (pass, warn,
fail, skip), a message a sysadmin understands, a remedy that says what to do, and the raw
facts it looked at (``details``). A fail blocks the migration (an administrator may
override one marked ``overridable``); a warning needs an explicit acknowledgement.

The checks run concurrently in threads (``run.run_preflight``). What they need from
libvirt is gathered through ``Context.fact()`` (``context.py``), which computes each fact
once per run, so checks stay independent but libvirt is asked each thing once. Every
libvirt call goes through hosts.hypervisor with a timeout, and the whole checklist is
bounded by KVMWEB_PREFLIGHT_TIMEOUT. Ranking the wizard's targets (``ranking.py``) reads
stored facts only.

Modules: ``report`` (CheckResult, Report), ``context`` (Context, Unavailable),
``registry`` (the ``@check`` decorator), ``checks/`` (the checks), ``run``
(run_preflight), ``ranking`` (rank_targets).
"""

from hosts.domxml import parse_guest
from migrations_app.preflight.checks.prediction import measure_dirty_rate, predict_precopy, prime_dirty_rate
from migrations_app.preflight.context import Context, Unavailable
from migrations_app.preflight.ranking import rank_targets
from migrations_app.preflight.registry import checks, title
from migrations_app.preflight.report import FAIL, PASS, SKIP, STATUSES, WARN, CheckResult, Report
from migrations_app.preflight.run import run_preflight

__all__ = [
    "FAIL",
    "PASS",
    "SKIP",
    "STATUSES",
    "WARN",
    "CheckResult",
    "Context",
    "Report",
    "Unavailable",
    "checks",
    "measure_dirty_rate",
    "parse_guest",
    "predict_precopy",
    "prime_dirty_rate",
    "rank_targets",
    "run_preflight",
    "title",
]
