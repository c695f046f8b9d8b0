"""Pages at inventory scale on PostgreSQL: the dashboard and the VM list issue a fixed
number of queries, whoever looks (benchmarks/page_throughput.py measures their speed).
A self-service user's VM list once cost one extra query per row (the owner column)."""

import uuid

import pytest

from hosts.models import VM, Host

pytestmark = pytest.mark.django_db


@pytest.fixture
def inventory(alice):
    hosts = Host.objects.bulk_create(
        Host(name=f"kvm{i:02d}", uri=f"qemu+ssh://root@kvm{i:02d}.example.internal/system") for i in range(10)
    )
    VM.objects.bulk_create(
        VM(uuid=uuid.uuid4(), name=f"vm-{i:04d}", host=hosts[i % 10], state="running", owner_user=alice)
        for i in range(300)
    )
    return hosts


@pytest.mark.parametrize("path", ["/", "/vms/", "/vms/?page=3", "/vms/?state=running"])
def test_it_keeps_page_queries_flat_for_everyone(
    inventory, login, operator, alice, path, django_assert_max_num_queries
):
    for user in (operator, alice):
        client = login(user)
        client.get(path)  # warm caches that are not per request (content types, ...)
        with django_assert_max_num_queries(15):
            response = client.get(path)
        assert response.status_code == 200
        if path.startswith("/vms/"):
            assert b"vm-0" in response.content
