"""The VM list: whitelisted sorting with a stable order, filtering as you type (htmx
partial), per-row Migrate and power actions only for those who may, multi-select, and a
query count that does not grow with the rows."""

import re
import uuid

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from hosts.models import VM, Host, HostGroup
from kvmweb.accounts.models import SelfServicePolicy

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def fleet(alice):
    a = Host.objects.create(name="a-host", uri="test:///a")
    b = Host.objects.create(name="b-host", uri="test:///b")
    rows = [
        ("web", a, "running", 2 << 30, alice),
        ("db", b, "shutoff", 8 << 30, None),
        ("cache", a, "running", 2 << 30, None),
        ("batch", None, "shutoff", 1 << 30, alice),
    ]
    return {
        name: VM.objects.create(
            uuid=uuid.uuid4(), name=name, host=host, state=state, memory=memory, owner_user=owner
        )
        for name, host, state, memory, owner in rows
    }


def names(response):
    return re.findall(r'<a href="/vms/\d+/">([^<]+)</a>', response.content.decode())


def test_it_sorts_by_whitelisted_columns_in_both_directions(fleet, login, operator):
    client = login(operator)
    assert names(client.get("/vms/")) == ["batch", "cache", "db", "web"]
    assert names(client.get("/vms/?sort=-name")) == ["web", "db", "cache", "batch"]
    # Equal memory (web, cache): the primary key breaks the tie, in the same direction.
    assert names(client.get("/vms/?sort=memory")) == ["batch", "web", "cache", "db"]
    assert names(client.get("/vms/?sort=-memory")) == ["db", "cache", "web", "batch"]
    # A VM without a host comes last either way.
    assert names(client.get("/vms/?sort=host")) == ["web", "cache", "db", "batch"]
    assert names(client.get("/vms/?sort=-host")) == ["db", "cache", "web", "batch"]


def test_it_ignores_sort_keys_outside_the_whitelist(fleet, login, operator):
    client = login(operator)
    for bad in ("uuid", "owner_user__password", "-host__uri", "name;drop"):
        response = client.get("/vms/", {"sort": bad})
        assert response.status_code == 200 and names(response) == ["batch", "cache", "db", "web"], bad


def test_it_links_column_headers_to_the_other_direction(fleet, login, operator):
    body = login(operator).get("/vms/?sort=memory&state=running&page=1").content.decode()
    header = re.search(r'<a class="sort asc" href="([^"]+)" data-testid="sort-memory"', body)
    assert header is not None
    url = header.group(1).replace("&amp;", "&")
    assert "sort=-memory" in url and "state=running" in url and "page=" not in url


def test_it_answers_htmx_with_only_the_results(fleet, login, operator):
    client = login(operator)
    response = client.get("/vms/", {"q": "ca", "sort": "-name"}, headers={"HX-Request": "true"})
    body = response.content.decode()
    assert names(response) == ["cache"] and "<html" not in body and 'name="q"' not in body
    assert "HX-Request" in response["Vary"]
    full = client.get("/vms/", {"q": "ca"})
    assert "<html" in full.content.decode() and names(full) == ["cache"]


def test_it_offers_row_actions_only_to_those_who_may(fleet, login, operator, auditor, alice):
    body = login(operator).get("/vms/").content.decode()
    web, db = fleet["web"], fleet["db"]
    assert f"/migrations/new/?vm={web.pk}" in body
    assert 'data-select-all="vm"' in body and f'name="vm" value="{web.pk}"' in body
    web_row = body.split(f'data-vm="{web.pk}"')[1].split("</tr>")[0]
    db_row = body.split(f'data-vm="{db.pk}"')[1].split("</tr>")[0]
    assert 'value="shutdown"' in web_row and 'value="destroy"' in web_row and 'value="start"' not in web_row
    assert 'value="start"' in db_row and 'value="shutdown"' not in db_row
    # Auditors read everything and change nothing: no actions.
    body = login(auditor).get("/vms/").content.decode()
    assert "/migrations/new/" not in body and 'form="vm-power"' not in body
    # Self-service owners see their own VMs with power actions; none without a host.
    body = login(alice).get("/vms/").content.decode()
    assert names_in(body) == ["batch", "web"]
    assert body.count('form="vm-power"') == 3  # web (running): shut down, reboot, force off
    # Migrate only where a self-service policy lets her go on (web's host has no group yet).
    assert "/migrations/new/" not in body
    prod, dev = HostGroup.objects.create(name="prod"), HostGroup.objects.create(name="dev")
    Host.objects.filter(pk=web.host_id).update(group=prod)
    SelfServicePolicy.objects.create(source_group=prod, allowed_modes=["live"]).target_groups.add(dev)
    body = login(alice).get("/vms/").content.decode()
    assert f"/migrations/new/?vm={web.pk}" in body and f"/migrations/new/?vm={fleet['batch'].pk}" not in body


def names_in(body):
    return re.findall(r'<a href="/vms/\d+/">([^<]+)</a>', body)


def test_it_keeps_the_query_count_flat(login, operator, alice):
    host = Host.objects.create(name="h", uri="test:///h")

    def count(n, user, path):
        VM.objects.all().delete()
        VM.objects.bulk_create(
            VM(uuid=uuid.uuid4(), name=f"vm-{i:03d}", host=host, state="running", owner_user=alice)
            for i in range(n)
        )
        client = login(user)
        client.get(path)
        with CaptureQueriesContext(connection) as ctx:
            assert client.get(path).status_code == 200
        return len(ctx.captured_queries)

    for user in (operator, alice):
        for path in ("/vms/?sort=-owner", "/vms/?sort=host&q=vm"):
            assert count(5, user, path) == count(120, user, path), (user, path)
