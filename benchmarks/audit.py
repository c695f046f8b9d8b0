#!/usr/bin/env python3
"""Audit history benchmark: write N chained events, verify the chain, page and export it.

Prints: record() events/s (each event its own transaction, as the services write them),
verify_audit events/s, audit-page p50/p95 in ms (first page, a deep page, filtered by
action, by object, by who) with the SQL query count per page, and CSV/JSON export rows/s
and MB/s through the streaming views.

Run: .venv/bin/python benchmarks/audit.py [--events 20000] [--requests 30]
Uses a throwaway SQLite database under a temp dir; touches nothing else.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TMP = Path(tempfile.mkdtemp(prefix="kvmweb-bench-audit-"))
os.environ["KVMWEB_DATA_DIR"] = str(TMP)
os.environ["KVMWEB_ALLOWED_HOSTS"] = "testserver"
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kvmweb.settings")

import django  # noqa: E402

django.setup()

from django.contrib.auth.models import Group, User  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection, transaction  # noqa: E402
from django.test import Client  # noqa: E402
from django.test.utils import CaptureQueriesContext  # noqa: E402

from kvmweb.accounts.roles import AUDITOR  # noqa: E402
from kvmweb.audit import record  # noqa: E402
from kvmweb.audit.models import AuditEvent  # noqa: E402
from kvmweb.audit.services import verify_chain  # noqa: E402

ACTIONS = ["host.register", "vm.owner", "migration.request", "migration.finish", "auth.login"]


def ms(values):
    values = sorted(values)
    p95 = values[min(len(values) - 1, int(len(values) * 0.95))]
    return f"p50 {statistics.median(values) * 1000:6.1f} ms  p95 {p95 * 1000:6.1f} ms"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--requests", type=int, default=30)
    args = parser.parse_args()

    call_command("migrate", verbosity=0)
    admin = User.objects.create_user("bench-admin")
    auditor = User.objects.create_user("bench-auditor")
    auditor.groups.add(Group.objects.get(name=AUDITOR))

    started = time.perf_counter()
    for i in range(args.events):
        with transaction.atomic():
            record(
                ACTIONS[i % len(ACTIONS)],
                actor=admin,
                target_type="hosts.vm",
                target_id=str(i % 500),
                target_name=f"vm-{i % 500:03d}",
                details={"i": i, "note": "benchmark event", "figures": [i, i * 2, i * 3]},
            )
    elapsed = time.perf_counter() - started
    print(f"record():        {args.events / elapsed:8.0f} events/s  ({args.events} events, {elapsed:.1f} s)")

    started = time.perf_counter()
    count, bad, _reason = verify_chain()
    elapsed = time.perf_counter() - started
    assert count == args.events and bad is None
    print(f"verify_chain():  {count / elapsed:8.0f} events/s  ({elapsed:.2f} s for {count})")

    client = Client()
    client.force_login(auditor)
    deep = max(1, args.events // 50 // 2)
    pages = {
        "first page": "/audit/",
        f"page {deep}": f"/audit/?page={deep}",
        "by action": "/audit/?action=migration.",
        "by object": "/audit/?target=hosts.vm:123",
        "by who": "/audit/?who=bench",
    }
    for label, url in pages.items():
        times = []
        for _ in range(args.requests):
            t0 = time.perf_counter()
            response = client.get(url)
            times.append(time.perf_counter() - t0)
            assert response.status_code == 200
        with CaptureQueriesContext(connection) as queries:
            client.get(url)
        print(f"audit page {label:12s} {ms(times)}  {len(queries)} queries")

    for fmt in ("csv", "json"):
        t0 = time.perf_counter()
        response = client.get(f"/audit/export.{fmt}")
        size = sum(len(chunk) for chunk in response.streaming_content)
        elapsed = time.perf_counter() - t0
        rows = AuditEvent.objects.count()
        print(
            f"export {fmt:4s}     {rows / elapsed:8.0f} rows/s  {size / elapsed / 1e6:6.1f} MB/s"
            f"  ({size / 1e6:.1f} MB in {elapsed:.2f} s)"
        )


if __name__ == "__main__":
    main()
