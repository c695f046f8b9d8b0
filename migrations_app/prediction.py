"""Learned costs of live migrations per host pair, and the prediction that uses them.

A live migration's duration as libvirt reports it (``time_elapsed``) is more than its
memory at the transfer rate: the target QEMU is started, devices are set up, the device
state is sent at the switch-over, and both sides shake hands. That fixed part is learned
from every finished live job as ``elapsed - bytes moved / QEMU's transfer rate`` (the
``memory_bps`` of the completed job, which QEMU measures over the transfer only) and stored
as a MigrationCostSample. The downtime has a floor for the same reasons (the device state
and the switch-over are paid even when no memory is left), learned from the downtimes
the jobs really had.

The preflight's prediction takes, per (source, target): the median of the last ten fixed
parts, the median of the last ten downtimes as the floor, and the median transfer rate of
the last ten jobs that ran uncapped and alone as the link's rate. With no sample yet it
predicts as before (no fixed part, the model's downtime). Per VM it learns how much of
QEMU's resident memory is not guest data (QEMU's own code and buffers: resident memory
counted by the preflight minus what the job moved), so a small guest is not predicted to
send tens of MiB it does not have.
"""

import logging
import statistics

from django.db import DatabaseError
from django.utils.translation import gettext as _

from migrations_app.models import MigrationCostSample

log = logging.getLogger(__name__)

MIB = 1048576
WINDOW = 10


def cost_sample(stats):
    """(elapsed_ms, data_bytes, fixed_ms, transfer_bytes_per_s) from a completed job's
    statistics, or None when they do not say (no transfer rate, nothing moved)."""
    elapsed = stats.get("time_elapsed") or 0
    data = stats.get("memory_processed") or stats.get("data_processed") or 0
    rate = stats.get("memory_bps") or 0
    if not elapsed or not data or not rate:
        return None
    transfer_ms = data / rate * 1000
    return int(elapsed), int(data), max(0, round(elapsed - transfer_ms)), float(rate)


def record(job, stats, link_mibs):
    """Store what a successful live job cost (idempotent: one sample per job). A job with
    its disks copied is not counted: its disk phase is not part of the fixed cost.
    ``link_mibs`` is jobrun.link_sample's answer: None when the job was capped or shared
    a host with another migration, and then its rate says nothing about the link."""
    if job.mode != "live" or job.source_id is None or job.target_id is None:
        return None
    sample = cost_sample(stats)
    if sample is None:
        return None
    elapsed, data, fixed, rate = sample
    downtime = stats.get("downtime")
    counted = counted_memory_mib(job.preflight)
    overhead = round(counted - data / MIB, 1) if counted is not None else None
    try:
        row, _created = MigrationCostSample.objects.update_or_create(
            job=job,
            defaults={
                "source_id": job.source_id,
                "target_id": job.target_id,
                "elapsed_ms": elapsed,
                "data_bytes": data,
                "fixed_ms": fixed,
                "downtime_ms": int(downtime) if downtime is not None else None,
                "transfer_mibs": round(rate / MIB, 1) if link_mibs else None,
                "vm_id": job.vm_id,
                "overhead_mib": overhead,
            },
        )
    except DatabaseError as exc:  # a prediction aid: never fails a job
        log.warning("job %s: cost sample not stored: %s", job.pk, exc)
        return None
    return row


def counted_memory_mib(report):
    """The memory (MiB) a stored preflight report counted to send, before any learned
    correction, or None."""
    for result in (report or {}).get("results", []):
        if result.get("id") == "prediction":
            details = result.get("details") or {}
            value = details.get("memory_resident_mib", details.get("memory_to_send_mib"))
            return float(value) if value is not None else None
    return None


def memory_to_send(memory, vm, details):
    """The bytes of RAM a live migration of ``vm`` will send: ``memory`` (QEMU's resident
    memory, or the VM's size) less what its earlier migrations showed is not guest data
    (the median of its last three), never below 1 MiB. ``details`` gets both figures."""
    details["memory_resident_mib"] = round(memory / MIB)
    try:
        overheads = list(
            MigrationCostSample.objects.filter(vm=vm, overhead_mib__isnull=False).values_list(
                "overhead_mib", flat=True
            )[:3]
        )
    except (DatabaseError, ValueError, TypeError):  # no database, or an unsaved VM
        overheads = []
    if not overheads:
        return memory
    # Bounded: resident memory that is mostly zero pages (a guest that zeroes freed
    # memory) also "never travels", but that is the guest's state at that moment, not
    # QEMU's own memory; unbounded, it would make a later, fuller guest look tiny.
    overhead = min(max(0.0, statistics.median(overheads)), MAX_OVERHEAD_MIB)
    details["memory_overhead_mib"] = round(overhead, 1)
    memory = max(MIB, memory - overhead * MIB)
    details["memory_to_send_mib"] = round(memory / MIB)
    return memory


# QEMU's own resident memory (its code, device state, buffers): tens of MiB on the lab.
MAX_OVERHEAD_MIB = 128


def learned(source, target):
    """What kvmweb learned about migrations from ``source`` to ``target``: a dict with
    fixed_s, downtime_floor_ms, transfer_mibs (each None when unknown) and samples (count)."""
    out = {"fixed_s": None, "downtime_floor_ms": None, "transfer_mibs": None, "samples": 0}
    if source is None or target is None:
        return out
    try:
        rows = list(
            MigrationCostSample.objects.filter(source=source, target=target).values(
                "fixed_ms", "downtime_ms", "transfer_mibs"
            )[:50]
        )
    except DatabaseError:  # no database (benchmark, command without migrate)
        return out
    fixed = [r["fixed_ms"] for r in rows][:WINDOW]
    downtimes = [r["downtime_ms"] for r in rows if r["downtime_ms"] is not None][:WINDOW]
    rates = [r["transfer_mibs"] for r in rows if r["transfer_mibs"]][:WINDOW]
    out["samples"] = len(fixed)
    if fixed:
        out["fixed_s"] = statistics.median(fixed) / 1000
    if downtimes:
        out["downtime_floor_ms"] = round(statistics.median(downtimes))
    if rates:
        out["transfer_mibs"] = float(statistics.median(rates))
    return out


def link_rate(source, target):
    """(MiB/s, how we know) of the link's transfer rate learned from uncapped jobs that
    ran alone, or None when none did."""
    rate = learned(source, target)["transfer_mibs"]
    if rate is None:
        return None
    return rate, _(
        "the median transfer rate of the last uncapped migrations that ran alone between these hosts"
    )


def with_learned_costs(model, source, target, details):
    """The pre-copy model's result with the pair's learned fixed cost added to its
    seconds and its downtime raised to the pair's floor; ``details`` gets the figures."""
    costs = learned(source, target)
    details["learned_samples"] = costs["samples"]
    if not model.get("converges"):
        return model
    model = dict(model)
    if costs["fixed_s"] is not None:
        details["fixed_seconds"] = round(costs["fixed_s"], 2)
        model["seconds"] += costs["fixed_s"]
    if costs["downtime_floor_ms"] is not None and model.get("downtime_ms") is not None:
        details["downtime_floor_ms"] = costs["downtime_floor_ms"]
        model["downtime_ms"] = max(model["downtime_ms"], costs["downtime_floor_ms"])
    return model
