"""The registry of checks: each check declares its id, title and place in the list once,
with the ``@check`` decorator, and returns ``result(...)``; the runner fills in the id and
the title (in the viewer's language).

Adding a check: a function ``check_x(ctx)`` in the file of ``checks/`` that fits its theme
(or a new file imported by ``checks/__init__.py``), decorated with
``@check("x", gettext_lazy("Title"), order=N)``, returning ``result(PASS|WARN|FAIL|SKIP,
message, remedy, details, overridable)``. Document the id in docs/preflight.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from migrations_app.preflight.report import CheckResult

MIB = 1024 * 1024
QEMU_DEFAULT_DOWNTIME_MS = 300  # QEMU's default downtime-limit


@dataclass(frozen=True)
class Check:
    """One registered check: its id (stored in reports, acknowledged and overridden by
    id), its title (lazy, translated when shown), its place in the list and the function."""

    id: str
    title: object
    order: int
    fn: object


_REGISTRY: dict[str, Check] = {}


def check(check_id, title, *, order):
    """Register the decorated ``fn(ctx) -> CheckResult`` as check ``check_id``."""

    def register(fn):
        if check_id in _REGISTRY and _REGISTRY[check_id].fn.__qualname__ != fn.__qualname__:
            raise ValueError(f"preflight check {check_id!r} is registered twice")
        _REGISTRY[check_id] = Check(check_id, title, order, fn)
        return fn

    return register


def checks():
    """Every registered check in display order."""
    from migrations_app.preflight import checks as _modules  # noqa: F401  (registers them)

    return sorted(_REGISTRY.values(), key=lambda c: c.order)


def title(check_id):
    """The title of check ``check_id`` in the active language."""
    checks()
    return str(_REGISTRY[check_id].title)


def result(status, message, remedy="", details=None, overridable=False):
    """What a check returns; the runner sets its id and title."""
    return CheckResult(
        id="",
        title="",
        status=status,
        message=message,
        remedy=remedy,
        details=details or {},
        overridable=overridable,
    )


def result_for(check_id, status, message, remedy="", details=None, overridable=False):
    """A result of check ``check_id`` made outside the check (skip, timeout, crash)."""
    made = result(status, message, remedy, details, overridable)
    made.id, made.title = check_id, title(check_id)
    return made


def mib(value):
    return None if value is None else round(value / MIB)


def version(number):
    if not number:
        return "?"
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


def sentence(text):
    """Capitalize the first letter only (paths and names keep their case)."""
    return text[:1].upper() + text[1:]


def uri_flag(host):
    return f"-c {host.uri}"
