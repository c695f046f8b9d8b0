"""A real live migration on the scale-out stack: PostgreSQL, Redis, two `migrations`
clusters (as if on two worker machines) and two daphne processes with a watcher each.

The job message is delivered twice (a duplicate, as a redelivery would); exactly one
worker runs the migration, the guest ends on the target and keeps running, and both
watchers, on different daphne processes, follow the progress and see the final state.
"""

import asyncio
import re
import time

import pytest

import lab as labkit
from hosts import services as host_services
from hosts.models import VM
from migrations_app.models import JobEvent, MigrationJob
from migrations_app.plan import MigrationPlan
from migrations_app.preflight import run_preflight
from migrations_app.services import do_create_job, enqueue
from tests.scaleout.wsclient import WebSocket

pytestmark = [pytest.mark.lab, pytest.mark.django_db(transaction=True)]
STATUS = re.compile(r'id="job-progress-\d+"[^>]*data-status="(\w+)"')
SEQ = re.compile(r'data-seq="(\d+)"')


async def follow(port, job_id, cookies, deadline):
    """Every (status, seq) this watcher receives until the job's final state arrives."""
    ws = await WebSocket.connect("127.0.0.1", port, f"/ws/jobs/{job_id}/", cookies=cookies)
    seen = []
    try:
        while time.monotonic() < deadline:
            text = await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic()))
            status, seq = STATUS.search(text), SEQ.search(text)
            if status and seq:
                seen.append((status.group(1), int(seq.group(1))))
                if status.group(1) in MigrationJob.FINAL_STATES:
                    return seen
        return seen
    finally:
        await ws.close()


def test_it_migrates_once_with_two_clusters_and_streams_to_two_daphnes(
    lab, lab_guest, processes, client, operator
):
    hosts = {h: host_services.do_register_host(h, lab.uri(h)) for h in ("lab-a", "lab-b")}
    guest = lab_guest("so", host="lab-a", storage="shared")
    for host in hosts.values():
        host_services.do_sync_inventory(host)
    clusters = [processes.qcluster("migrations", name=f"qcluster-migrations-{i}") for i in (1, 2)]
    web = [processes.daphne(f"daphne-{i}") for i in (1, 2)]
    client.force_login(operator)
    cookies = {"sessionid": client.cookies["sessionid"].value}
    processes.wait_running(*clusters)  # both polling

    vm = VM.objects.get(uuid=guest.uuid)
    options = {"bandwidth": 32}
    report = run_preflight(
        MigrationPlan(vm, vm.host, hosts["lab-b"], "live", options), measure_dirty_rate=False
    )
    assert not report.fails, [(r.id, r.message) for r in report.fails]
    job = do_create_job(
        vm,
        hosts["lab-b"],
        "live",
        options,
        actor=operator,
        report=report,
        acknowledged=[r.id for r in report.warnings],
    )
    enqueue(job)  # a duplicate message: both clusters may pick one up

    async def watch():
        deadline = time.monotonic() + 180
        return await asyncio.gather(*(follow(d.port, job.pk, cookies, deadline) for d in web))

    seen_a, seen_b = asyncio.run(watch())
    job.refresh_from_db()
    assert job.status == MigrationJob.SUCCEEDED, (job.error, processes.logs())
    assert any(c.poll() is None for c in clusters)
    for seen in (seen_a, seen_b):
        assert seen and seen[-1][0] == MigrationJob.SUCCEEDED, seen
        assert len(seen) >= 3  # snapshot, progress on the way, the final state
        seqs = [s for _status, s in seen]
        assert seqs == sorted(seqs)  # never an older state after a newer one
        assert seen[-1][1] == job.progress_seq
    assert JobEvent.objects.filter(job=job, message__startswith="Picked up by worker").count() == 1
    assert labkit.where(guest.name) == {"lab-b": "running"}
    labkit.wait_counter_moves("lab-b", guest.name)
    assert VM.objects.get(uuid=guest.uuid).host.name == "lab-b"
    assert job.memory_total > 0 and job.data_processed > 0 and job.downtime_ms is not None
