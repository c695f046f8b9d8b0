"""What the checks of one run share (``Context``): the plan, open connections and facts
computed once per run, bounded by the run's deadline."""

from __future__ import annotations

import threading
import time

from django.conf import settings
from django.utils.translation import gettext as _

from hosts import hypervisor
from hosts.domxml import parse_guest


def setting(name, default):
    """A preflight setting (``KVMWEB_PREFLIGHT_*`` in the environment, see docs/preflight.md)."""
    return getattr(settings, name, default)


class Unavailable(Exception):
    """A fact a check needs could not be obtained; the check becomes ``skip`` (the cause
    is reported by the check that owns it, e.g. Connections)."""


class _Memo:
    __slots__ = ("done", "value", "error")

    def __init__(self):
        self.done = threading.Event()
        self.value = None
        self.error = None


class Context:
    """What the checks of one run share: the plan, settings, open connections, and
    facts computed once (``fact(key, fn)``), bounded by the run's deadline."""

    def __init__(self, plan, *, memory_margin_mib, deadline, measure_dirty_rate=True):
        self.plan = plan
        self.vm, self.source, self.target = plan.vm, plan.source, plan.target
        self.mode, self.options = plan.mode, plan.options
        self.strategy = plan.strategy  # the mode (migrations_app/modes/): what it moves and how
        self.memory_margin_mib = memory_margin_mib
        self.deadline = deadline
        self.measure_dirty_rate = measure_dirty_rate
        self._memo = {}
        self.left_copies = {}  # path -> LeftCopy on the target (read by run_preflight)
        self.stored_dirty_rate = None  # a stored measurement (dirtyrate.recall), read by run_preflight
        self._lock = threading.Lock()
        self._conns = []

    def fact(self, key, fn):
        """The value of fact ``key``, computing it with ``fn()`` if nobody has yet.
        Errors are remembered too, so every check sees the same outcome."""
        with self._lock:
            memo = self._memo.get(key)
            mine = memo is None
            if mine:
                memo = self._memo[key] = _Memo()
        if mine:
            try:
                memo.value = fn()
            except BaseException as exc:
                memo.error = exc
            finally:
                memo.done.set()
        elif not memo.done.wait(max(0.0, self.deadline - time.monotonic())):
            raise Unavailable(_("Not checked: gathering %(what)s took too long.") % {"what": key})
        if memo.error is not None:
            raise memo.error
        return memo.value

    # -- connections and host facts ------------------------------------------------

    def conn(self, side):
        host = self.source if side == "source" else self.target

        def open_():
            conn = hypervisor.connect(
                host.uri,
                timeout=setting("PREFLIGHT_CONNECT_TIMEOUT", 3.0),
                call_timeout=setting("PREFLIGHT_CALL_TIMEOUT", 8.0),
            )
            with self._lock:
                self._conns.append(conn)
            return conn

        return self.fact(f"conn:{side}", open_)

    def need_conn(self, side):
        try:
            return self.conn(side)
        except hypervisor.HypervisorError:
            host = self.source if side == "source" else self.target
            raise Unavailable(
                _("Not checked: %(host)s could not be reached (see Connections).") % {"host": host.name}
            ) from None

    def host(self, side):
        conn = self.need_conn(side)
        return self.fact(f"host:{side}", conn.preflight_host)

    def domain(self):
        """The source's view of the VM; Unavailable when it is not there. A run given it
        (``known``) opens no source connection for it."""
        try:
            return self.fact("domain", lambda: self.need_conn("source").preflight_domain(self.vm.uuid))
        except hypervisor.DomainNotFound:
            raise Unavailable(
                _("Not checked: the VM was not found on %(host)s (see VM state).")
                % {"host": self.source.name}
            ) from None

    def guest(self):
        return self.fact("guest", lambda: parse_guest(self.domain()["xml"]))

    def domcaps(self, side):
        g = self.guest()
        conn = self.need_conn(side)
        return self.fact(
            f"domcaps:{side}",
            lambda: conn.domain_capabilities(g["arch"], g["machine"] or None, g["virttype"]),
        )

    def storage(self, side):
        paths = [d["path"] for d in self.guest()["disks"] if d["path"] and d["kind"] in ("file", "block")]
        paths += [p for p in (self.guest()["nvram"],) if p]
        conn = self.need_conn(side)
        return self.fact(f"storage:{side}", lambda: conn.storage_lookup(sorted(set(paths))))

    def shared_dirs(self):
        """{directory: True | False | None}: whether the target sees what the source
        writes in each disk directory, proved with a probe volume (hypervisor.probe_shared)."""
        dirs = sorted(
            {d["path"].rsplit("/", 1)[0] for d in self.guest()["disks"] if d["path"] and d["kind"] == "file"}
        )
        src, dst = self.need_conn("source"), self.need_conn("target")
        return self.fact("shared_dirs", lambda: src.probe_shared(dst, dirs))

    def seed(self, known):
        """Facts another run of the same plan read a moment ago ({key: value}), taken as
        they are (runner.after_landing)."""
        for key, value in known.items():
            memo = self._memo[key] = _Memo()
            memo.value = value
            memo.done.set()

    def settled(self, keys):
        """{key: value} of the facts among ``keys`` this run read without an error."""
        with self._lock:
            memos = {k: m for k, m in self._memo.items() if k in keys}
        return {k: m.value for k, m in memos.items() if m.done.is_set() and m.error is None}

    def close(self):
        for conn in self._conns:
            conn.close()
