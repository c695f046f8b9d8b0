"""Duration and convergence: the dirty rate (measured once and shared), the learned link
speed and the pre-copy model."""

from __future__ import annotations

import math
import statistics
import threading
import time

from django.db import DatabaseError
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from hosts import hypervisor
from migrations_app import prediction as learned
from migrations_app.convergence import Ladder
from migrations_app.models import MigrationJob
from migrations_app.preflight.context import Unavailable
from migrations_app.preflight.context import setting as _setting
from migrations_app.preflight.registry import MIB, QEMU_DEFAULT_DOWNTIME_MS, check, result
from migrations_app.preflight.registry import mib as _mib
from migrations_app.preflight.report import FAIL, PASS, WARN

_dirty_cache = {}
_dirty_lock = threading.Lock()


def measure_dirty_rate(conn, host, uuid):
    """The VM's dirty rate in MiB/s, measured by libvirt (startDirtyRateCalc). A recent
    measurement of the same VM on the same host is reused (concurrent runs share one);
    raises HypervisorError where the host cannot measure."""
    key = (host.uri, str(uuid))
    max_age = _setting("PREFLIGHT_DIRTY_RATE_MAX_AGE", 60.0)
    with _dirty_lock:
        entry = _dirty_cache.get(key)
        if entry and entry["event"].is_set() and time.monotonic() - entry["at"] > max_age:
            entry = None
        if entry is None:
            entry = _dirty_cache[key] = {
                "event": threading.Event(),
                "at": time.monotonic(),
                "value": None,
                "error": None,
            }
            mine = True
        else:
            mine = False
    if mine:
        try:
            entry["value"] = conn.measure_dirty_rate(
                uuid,
                seconds=_setting("PREFLIGHT_DIRTY_RATE_SECONDS", 1),
                mode=_setting("PREFLIGHT_DIRTY_RATE_MODE", "page-sampling"),
            )
            entry["value"]["measured_at"] = time.time()
        except hypervisor.HypervisorError as exc:
            entry["error"] = exc
            with _dirty_lock:
                _dirty_cache.pop(key, None)  # do not remember failures
        finally:
            entry["at"] = time.monotonic()
            entry["event"].set()
    else:
        entry["event"].wait(_setting("PREFLIGHT_DIRTY_RATE_SECONDS", 1) + 5)
    if entry["error"] is not None:
        raise entry["error"]
    if entry["value"] is None:
        raise hypervisor.HypervisorTimeout(_("The dirty-rate measurement did not finish in time."))
    return dict(entry["value"], age_s=round(time.monotonic() - entry["at"], 1))


def prime_dirty_rate(vm):
    """Start measuring a running VM's dirty rate in the background, so a checklist run in
    the next KVMWEB_PREFLIGHT_DIRTY_RATE_MAX_AGE seconds reuses it instead of waiting a
    second (the wizard calls this as soon as a VM is chosen, before the target is). A
    checklist that starts while the measurement runs waits for it rather than starting a
    second one. Returns the thread, or None when there is nothing to measure."""
    host = vm.host
    if host is None or not getattr(vm, "is_running", False):
        return None

    def work():
        try:
            conn = hypervisor.connect(
                host.uri,
                timeout=_setting("PREFLIGHT_CONNECT_TIMEOUT", 3.0),
                call_timeout=_setting("PREFLIGHT_CALL_TIMEOUT", 8.0),
            )
        except hypervisor.HypervisorError:
            return
        try:
            measure_dirty_rate(conn, host, vm.uuid)
        except hypervisor.HypervisorError:
            pass  # the checklist says why when it runs
        finally:
            conn.close()

    thread = threading.Thread(target=work, name=f"dirty-rate {vm.name}", daemon=True)
    thread.start()
    return thread


def _link_bandwidth(ctx):
    """(MiB/s, how we know) of the source->target link: the median of what earlier
    uncapped migrations that ran alone between these hosts moved per second (bytes moved
    / time, recorded as ``result["link_mibs"]`` when they succeeded), else the configured
    assumption. A capped or concurrent job says nothing about the link and is never used."""
    try:
        results = list(
            MigrationJob.objects.filter(source=ctx.source, target=ctx.target, status=MigrationJob.SUCCEEDED)
            .order_by("-finished_at")
            .values_list("result", flat=True)[:50]
        )
    except DatabaseError:  # no database (benchmark, command without migrate): assume
        results = []
    rates = [r["link_mibs"] for r in results if (r or {}).get("link_mibs")][:10]
    if rates:
        return float(statistics.median(rates)), _(
            "the median rate of the last %(n)d uncapped migrations that ran alone between these hosts"
        ) % {"n": len(rates)}
    assumed = _setting("PREFLIGHT_ASSUMED_BANDWIDTH_MIBS", 117)
    return float(assumed), _(
        "assumed %(b)d MiB/s (about 1 Gbit/s; no earlier uncapped migration between these hosts to learn from)"
    ) % {"b": assumed}


def predict_precopy(memory, bandwidth, dirty, downtime_s, max_iterations=30):
    """Pre-copy model: pass 1 sends all memory M at bandwidth B; each next pass sends what
    was dirtied during the previous one (rate D); the guest is paused for the last pass
    once it fits in the allowed downtime. Returns a dict with converges, iterations,
    seconds and downtime_ms. Bytes and bytes/s in."""
    if bandwidth <= 0:
        return {"converges": False, "iterations": 0, "seconds": math.inf, "downtime_ms": None}
    remaining, total, iterations = float(memory), 0.0, 0
    while iterations < max_iterations:
        t = remaining / bandwidth
        iterations += 1
        total += t
        dirtied = min(dirty * t, float(memory))
        if dirtied / bandwidth <= downtime_s:
            stop = dirtied / bandwidth
            return {
                "converges": True,
                "iterations": iterations,
                "seconds": total + stop,
                "downtime_ms": round(stop * 1000 + 20),  # + device state, observed 15-80 ms
            }
        if dirty >= bandwidth:
            break
        remaining = dirtied
    return {"converges": False, "iterations": iterations, "seconds": math.inf, "downtime_ms": None}


# QEMU's page sampling (libvirt's default dirty-rate mode) hashes 512 sampled pages per
# GiB of RAM: each sampled page that changed counts as 2 MiB, so over a 1 s period the rate
# comes in steps of 2 MiB/s. A quiet small guest reads 0, 2 or 4 MiB/s for the same work
# (the lab: a guest rewriting 1 MiB every 100 ms read 0 17 times, 2 15 times and 4 five
# times in 37 measurements). A plan that converges one step lower is warned about, not
# refused; the running job's convergence verdict watches the real rate.
SAMPLING_PAGES_PER_GIB = 512


def _sampling_step(measured):
    """The resolution (MiB/s) of a page-sampling measurement, or 0 for exact modes."""
    if not measured or measured.get("mode") != "page-sampling":
        return 0.0
    return 1024 / SAMPLING_PAGES_PER_GIB / max(1, int(measured.get("period") or 1))


@check("prediction", gettext_lazy("Duration and convergence"), order=180)
def check_prediction(ctx):
    """Estimated duration and downtime, from the memory to send, the bandwidth (cap or
    link) and the measured dirty rate, with a verdict on convergence and advice."""
    dom = ctx.domain()
    g = ctx.guest()
    opts = ctx.options
    link, link_source = learned.link_rate(ctx.source, ctx.target) or _link_bandwidth(ctx)
    cap = opts.get("bandwidth")
    bw_mib = min(link, cap) if cap else link
    details = {
        "memory_mib": _mib(dom["memory"]),
        "bandwidth_mib_s": round(bw_mib, 1),
        "bandwidth_source": _("the bandwidth cap of this plan") if cap and cap <= link else link_source,
    }
    if ctx.strategy.definition_only:
        return result(
            PASS,
            _("Only the definition moves: this takes milliseconds; the VM stays off."),
            details=details,
        )
    disk_bytes = 0
    if ctx.strategy.copies_disks:
        try:
            storage = ctx.storage("target")
            for d in g["disks"]:
                if d["device"] == "disk" and d["path"] and not storage.get(d["path"], {}).get("visible"):
                    sizes = dom["disk_sizes"].get(d["dev"], {})
                    disk_bytes += sizes.get("physical") or sizes.get("capacity") or 0
        except Unavailable:
            pass
    details["disk_copy_mib"] = _mib(disk_bytes)
    bw = bw_mib * MIB
    if ctx.strategy.shuts_down:
        seconds = disk_bytes / bw if bw else 0
        shutdown = opts.get("shutdown_timeout", 120) if dom["active"] else 0
        details["copy_seconds"] = round(seconds, 1)
        return result(
            PASS,
            _(
                "Downtime is the whole operation: shutdown (up to %(s)d s), copying %(m).1f MiB of disks (about %(c).1f s at %(b).0f MiB/s), defining and starting on the target."
            )
            % {"s": shutdown, "m": disk_bytes / MIB, "c": seconds, "b": bw_mib},
            details=details,
        )
    # Live modes: how much RAM will really travel (zero pages are skipped).
    memory = dom["memory"]
    if dom.get("rss"):
        memory = min(memory, dom["rss"])
        details["memory_source"] = _("resident memory of the QEMU process (zero pages are not sent)")
    else:
        details["memory_source"] = _("the VM's full memory size (upper bound)")
    details["memory_to_send_mib"] = _mib(memory)
    memory = learned.memory_to_send(memory, ctx.vm, details)
    downtime_ms = opts.get("max_downtime") or QEMU_DEFAULT_DOWNTIME_MS
    details["max_downtime_ms"] = downtime_ms
    assumption = ""
    if dom["state"] != "running":
        dirty_mib = 0.0
        details["dirty_rate_source"] = _("the VM is paused: it dirties no memory")
    elif not ctx.measure_dirty_rate:
        dirty_mib = 0.0
        assumption = _("dirty rate not measured in a quick check (assumed 0: the estimate is a lower bound)")
        details["dirty_rate_source"] = assumption
    else:
        try:
            # A measurement younger than a minute stored by any process (dirtyrate.recall).
            measured = ctx.stored_dirty_rate or measure_dirty_rate(
                ctx.need_conn("source"), ctx.source, ctx.vm.uuid
            )
            dirty_mib = float(measured["mib_per_s"])
            details["dirty_rate"] = measured
            details["dirty_rate_source"] = _("measured by libvirt over %(p)d s (%(m)s)") % {
                "p": measured["period"],
                "m": measured["mode"],
            }
        except hypervisor.HypervisorError as exc:
            dirty_mib = 0.0
            assumption = _(
                "dirty rate could not be measured (%(e)s); assumed 0, so the estimate is a lower bound"
            ) % {"e": exc.message}
            details["dirty_rate_source"] = assumption
    details["dirty_rate_mib_s"] = dirty_mib
    model = predict_precopy(memory, bw, dirty_mib * MIB, downtime_ms / 1000)
    # A convergence ladder (migrations_app/convergence.py) raises the allowed downtime in
    # steps once the run stops converging: judge the plan at the ladder's top step too.
    ladder = Ladder(opts, downtime_ms)
    ladder_note = ""
    if not model["converges"] and ladder.policy != "none" and ladder.steps:
        top = ladder.steps[-1]
        details["ladder_top_downtime_ms"] = top
        at_top = predict_precopy(memory, bw, dirty_mib * MIB, top / 1000)
        if at_top["converges"]:
            model = at_top
            ladder_note = _(
                "Pre-copy does not converge within %(d)d ms of downtime; the convergence ladder raises it "
                "step by step up to %(t)d ms, where it would (%(n)d step(s), up to %(w)d s apart)."
            ) % {"d": downtime_ms, "t": top, "n": len(ladder.steps), "w": ladder.step_seconds}
        elif ladder.policy == "ladder-abort":
            ladder_note = _(
                "Even at the ladder's top step (%(t)d ms) it would not converge: the ladder will abort it "
                "and the VM stays on the source."
            ) % {"t": top}
    model = learned.with_learned_costs(model, ctx.source, ctx.target, details)
    copy_s = disk_bytes / bw if bw else 0
    details.update(
        iterations=model["iterations"],
        converges=model["converges"],
        estimated_seconds=None if not model["converges"] else round(model["seconds"] + copy_s, 2),
        estimated_downtime_ms=model["downtime_ms"],
        disk_copy_seconds=round(copy_s, 2),
    )
    facts = _("%(m)d MiB of RAM at %(b).0f MiB/s with a dirty rate of %(d).0f MiB/s") % {
        "m": _mib(memory),
        "b": bw_mib,
        "d": dirty_mib,
    }
    if disk_bytes:
        facts += _(", after copying %(c).1f MiB of disks (about %(s).1f s)") % {
            "c": disk_bytes / MIB,
            "s": copy_s,
        }
    if assumption:
        facts += f" ({assumption})"
    if not model["converges"]:
        if ladder_note:
            facts += ". " + ladder_note.rstrip(".")
        advice = _(
            "Enable auto-converge (throttles the guest's CPU), raise or remove the bandwidth cap, allow a longer "
            "max downtime, enable post-copy, or migrate Cold."
        )
        if opts.get("postcopy") or opts.get("auto_converge"):
            how = _("post-copy") if opts.get("postcopy") else _("auto-converge")
            return result(
                WARN,
                _("Pre-copy alone will not converge (%(f)s); it relies on %(h)s to finish.")
                % {"f": facts, "h": how},
                advice,
                details,
            )
        step = _sampling_step(details.get("dirty_rate"))
        if (
            step
            and predict_precopy(memory, bw, max(0.0, dirty_mib - step) * MIB, downtime_ms / 1000)["converges"]
        ):
            # One sampled page less and it converges: the measurement cannot tell.
            details["dirty_rate_step_mib_s"] = step
            return result(
                WARN,
                _(
                    "This migration may not converge (%(f)s): libvirt's page sampling reads the dirty rate in "
                    "steps of %(s).0f MiB/s, and at %(l).0f MiB/s it would. If it stalls, the job says so and you "
                    "can raise the bandwidth, switch to post-copy or cancel; the VM stays on the source."
                )
                % {"f": facts, "s": step, "l": max(0.0, dirty_mib - step)},
                advice,
                details,
            )
        return result(
            FAIL,
            _(
                "This migration will not converge: the guest dirties memory as fast as it can be sent (%(f)s). It would run until it is aborted."
            )
            % {"f": facts},
            advice,
            details,
            overridable=True,
        )
    total = model["seconds"] + copy_s
    message = _("About %(t).1f s, downtime about %(d)d ms, %(i)d pass(es): %(f)s.") % {
        "t": total,
        "d": model["downtime_ms"],
        "i": model["iterations"],
        "f": facts,
    }
    if ladder_note:
        # Converges only thanks to the ladder: the downtime will be longer than asked for.
        return result(
            WARN,
            message + " " + ladder_note,
            _("Raise or remove the bandwidth cap, or enable auto-converge, to keep the downtime shorter."),
            details,
        )
    timeout = opts.get("completion_timeout")
    if timeout and total > timeout:
        return result(
            WARN,
            message
            + " "
            + _("That is longer than the completion timeout (%(c)d s), which will %(a)s.")
            % {"c": timeout, "a": opts.get("completion_action", "abort")},
            _("Raise the completion timeout or the bandwidth."),
            details,
        )
    if bw_mib and dirty_mib / bw_mib > 0.5:
        return result(
            WARN,
            message
            + " "
            + _("The dirty rate is more than half the bandwidth: it may not settle if the load grows."),
            _("Consider auto-converge, more bandwidth, or post-copy."),
            details,
        )
    return result(PASS, message, details=details)
