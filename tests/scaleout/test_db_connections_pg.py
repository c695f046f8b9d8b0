"""Database connections of a daphne process stay bounded under concurrent requests.

Under ASGI, Django runs every request's sync code in a fresh thread; a connection kept
open past the request (CONN_MAX_AGE > 0) then belongs to a thread that is gone, so each
concurrent request leaves one more idle connection behind until PostgreSQL refuses new
ones ("remaining connection slots are reserved"). Django's docs say to disable persistent
connections under ASGI; kvmweb.env.database_from_url does (CONN_MAX_AGE = 0).
"""

import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connection

pytestmark = pytest.mark.django_db(transaction=True)


def backends_of(pid_of_ours):
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> %s",
            [pid_of_ours],
        )
        return cursor.fetchone()[0]


def test_it_keeps_a_daphne_process_connections_bounded_under_load(processes):
    web = processes.daphne("daphne")
    url = f"http://127.0.0.1:{web.port}/health/?scope=web"

    def hit(_):
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status

    with ThreadPoolExecutor(max_workers=20) as pool:
        statuses = list(pool.map(hit, range(200)))
    assert statuses == [200] * 200
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        ours = cursor.fetchone()[0]
    # One request thread at a time may hold one; 20 concurrent requests must not leave
    # anything like 20 (let alone 200) idle connections behind.
    assert backends_of(ours) <= 5
