"""Workers on PostgreSQL: the one-active-job-per-VM constraint, the runner's conditional
claim raced by two processes, and two django-q2 "migrations" clusters draining one queue
with duplicated messages. A migration is never started twice.

The jobs point at hosts whose libvirtd is not there (qemu+tcp to a closed loopback port):
the runner claims the job, its preflight fails fast ("cannot reach libvirtd") and the job
ends failed. That exercises exactly the claim path without the KVM lab.
"""

import json
import secrets
import threading
import time
import uuid

import pytest
from django.db import IntegrityError, connection, transaction
from django_q.models import OrmQ, Task

from hosts.models import VM, Host
from migrations_app.models import JobEvent, MigrationJob
from migrations_app.services import enqueue

RACER = """
import django, json, os, sys, time
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kvmweb.settings")
django.setup()
from migrations_app import runner
ids = {ids}
while time.time() < {start_at}:
    time.sleep(0.001)
print("RESULT " + json.dumps({{str(i): runner.run_job(i, worker="{name}") for i in ids}}), flush=True)
"""


def dead_hosts():
    """Two hosts on loopback addresses where nothing listens (refused at once)."""
    tag = secrets.token_hex(3)
    x, y = secrets.randbelow(250) + 1, secrets.randbelow(250) + 1
    a = Host.objects.create(name=f"dead-a-{tag}", uri=f"qemu+tcp://127.201.{x}.{y}/system")
    b = Host.objects.create(name=f"dead-b-{tag}", uri=f"qemu+tcp://127.202.{x}.{y}/system")
    return a, b


def queued_jobs(n, status=MigrationJob.QUEUED):
    a, b = dead_hosts()
    jobs = []
    for _ in range(n):
        vm = VM.objects.create(uuid=uuid.uuid4(), name=f"so-{secrets.token_hex(4)}", host=a)
        jobs.append(
            MigrationJob.objects.create(
                vm=vm,
                vm_name=vm.name,
                source=a,
                source_name=a.name,
                target=b,
                target_name=b.name,
                mode=MigrationJob.LIVE,
                status=status,
            )
        )
    return jobs


def pickups(job):
    return JobEvent.objects.filter(job=job, message__startswith="Picked up by worker").count()


def result_of(proc):
    for line in proc.log_path.read_text().splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise AssertionError(f"{proc.name} printed no result:\n{proc.log_path.read_text()[-3000:]}")


@pytest.mark.django_db
def test_it_enforces_one_active_job_per_vm_in_postgresql():
    (job,) = queued_jobs(1)
    twin = dict(
        vm=job.vm,
        vm_name=job.vm_name,
        source=job.source,
        source_name=job.source_name,
        target=job.target,
        target_name=job.target_name,
        mode=job.mode,
    )
    for active in MigrationJob.ACTIVE_STATES:
        with pytest.raises(IntegrityError, match="one_active_job_per_vm"), transaction.atomic():
            MigrationJob.objects.create(**twin, status=active)
    for final in MigrationJob.FINAL_STATES:
        MigrationJob.objects.create(**twin, status=final)  # history is unlimited
    assert MigrationJob.objects.filter(vm=job.vm).count() == 1 + len(MigrationJob.FINAL_STATES)
    # The database, not only the code: a raw insert is refused too.
    with pytest.raises(IntegrityError), transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            "UPDATE migrations_app_migrationjob SET status = 'running' WHERE vm_id = %s AND status = 'failed'",
            [job.vm_id],
        )


@pytest.mark.django_db(transaction=True)
def test_it_lets_only_one_of_two_racing_requests_hold_a_vm(close_thread_connections):
    (job,) = queued_jobs(1, status=MigrationJob.SUCCEEDED)
    outcomes, start = [], threading.Barrier(2)

    def request():
        try:
            start.wait()
            with transaction.atomic():
                MigrationJob.objects.create(
                    vm=job.vm,
                    vm_name=job.vm_name,
                    source=job.source,
                    source_name=job.source_name,
                    target=job.target,
                    target_name=job.target_name,
                    mode=job.mode,
                    status=MigrationJob.QUEUED,
                )
                time.sleep(0.3)  # hold the insert open so the other one must wait on it
            outcomes.append("created")
        except IntegrityError:
            outcomes.append("refused")
        finally:
            close_thread_connections()

    threads = [threading.Thread(target=request) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == ["created", "refused"]
    assert MigrationJob.objects.filter(vm=job.vm, status=MigrationJob.QUEUED).count() == 1


@pytest.mark.django_db(transaction=True)
def test_it_lets_exactly_one_of_two_processes_claim_each_job(processes):
    jobs = queued_jobs(12)
    ids = [j.pk for j in jobs]
    start_at = time.time() + 4.0  # both are imported and waiting by then
    racers = [
        processes.python(RACER.format(ids=ids, start_at=start_at, name=name), name)
        for name in ("racer-1", "racer-2")
    ]
    for proc in racers:
        assert proc.wait(timeout=120) == 0, processes.logs()
    one, two = (result_of(p) for p in racers)
    for job in jobs:
        job.refresh_from_db()
        won = [r for r in (one[str(job.pk)], two[str(job.pk)]) if r is not None]
        assert won == [MigrationJob.FAILED], (job.pk, one[str(job.pk)], two[str(job.pk)])
        assert job.status == MigrationJob.FAILED
        assert job.worker in ("racer-1", "racer-2")
        assert pickups(job) == 1
        assert "Cannot reach libvirtd" in job.error


@pytest.mark.django_db(transaction=True)
def test_it_runs_each_job_once_with_two_migration_clusters_and_duplicate_messages(processes, capsys):
    jobs = queued_jobs(10)
    clusters = [processes.qcluster("migrations", name=f"qcluster-migrations-{i}") for i in (1, 2)]
    processes.wait_running(*clusters)  # both polling, so they really compete
    for job in jobs:
        for _copy in range(2):  # a duplicated / redelivered message per job
            with transaction.atomic():
                enqueue(job)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        pending = MigrationJob.objects.filter(pk__in=[j.pk for j in jobs]).exclude(status=MigrationJob.FAILED)
        done_tasks = Task.objects.filter(func="migrations_app.tasks.run_migration").count()
        if not pending.exists() and done_tasks >= 2 * len(jobs):
            break
        if any(p.poll() is not None for p in clusters):
            pytest.fail(f"a qcluster died\n{processes.logs()}")
        time.sleep(0.5)
    else:
        pytest.fail(f"the clusters did not drain the queue\n{processes.logs()}")
    tasks = list(Task.objects.filter(func="migrations_app.tasks.run_migration"))
    assert len(tasks) == 2 * len(jobs)  # every message ran once (the broker's lock)...
    assert {t.cluster for t in tasks} == {"migrations"}
    by_job = {}
    for task in tasks:
        by_job.setdefault(task.args[0], []).append(task.result)
    for job in jobs:
        job.refresh_from_db()
        # ...but the claim let exactly one of the two copies work on the job.
        assert sorted(by_job[job.pk], key=str) == sorted([MigrationJob.FAILED, None], key=str)
        assert pickups(job) == 1
        assert job.status == MigrationJob.FAILED
    assert not OrmQ.objects.filter(key="migrations").exists()
    workers = sorted({j.worker for j in jobs})
    with capsys.disabled():
        print(f"\n  10 jobs x 2 messages on 2 clusters: claimed by workers {workers}")
