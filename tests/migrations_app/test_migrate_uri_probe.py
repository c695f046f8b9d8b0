"""The "migration_ports" check measures the address and port an explicit migration URI
names, from the source host and from kvmweb's machine. Only staff may set such a URI, so a
self-service user's dry run, wizard or API call with one is refused before the checklist
measures anything: otherwise it is a port scanner behind the hosts' firewall."""

import json

import pytest

from hosts import reach
from hosts.models import VM, Host, HostGroup
from kvmweb.accounts.models import SelfServicePolicy

URI = "tcp://10.9.8.7:22"
REFUSED = "An explicit migration URI can only be set by an operator."


@pytest.fixture
def probes(monkeypatch):
    """Every address the checklist measures (nothing goes on the network)."""
    seen = []

    def measure(source, address, ports, **kwargs):
        seen.append((address, tuple(ports)))
        return reach.Reach(reach.KVMWEB, address, [reach.PortState(p, reach.OPEN) for p in ports])

    monkeypatch.setattr(reach, "measure", measure)
    return seen


@pytest.fixture
def own_vm(db, alice):
    """alice's running VM on ha (group prod); her policy lets it move to hb (group dev)."""
    prod, dev = HostGroup.objects.create(name="prod"), HostGroup.objects.create(name="dev")
    ha = Host.objects.create(name="ha", uri="test:///default", group=prod, status=Host.REACHABLE)
    hb = Host.objects.create(name="hb", uri="test:///other", group=dev, status=Host.REACHABLE)
    vm = VM.objects.create(
        uuid="6695eb01-f6a4-8304-79aa-97f2502e193f", name="test", host=ha, state="running", owner_user=alice
    )
    policy = SelfServicePolicy.objects.create(
        source_group=prod, allowed_modes=["live"], max_bandwidth=None, requires_approval=False
    )
    policy.target_groups.add(dev)
    return vm, hb


def test_it_runs_no_probe_of_a_migration_uri_for_a_self_service_user(own_vm, probes, login, alice, operator):
    vm, hb = own_vm
    query = f"vm={vm.pk}&target={hb.pk}&mode=live&migrate_uri={URI}"
    client = login(alice)
    page = client.get(f"/migrations/preflight/?{query}")
    assert page.status_code == 400 and REFUSED in page.content.decode()
    wizard = client.get(f"/migrations/new/?{query}&step=preflight")
    assert wizard.status_code == 400 and REFUSED in wizard.content.decode()
    api = client.post(
        "/api/v1/preflight/",
        json.dumps({"vm": vm.pk, "target": hb.pk, "mode": "live", "options": {"migrate_uri": URI}}),
        content_type="application/json",
    )
    assert api.status_code == 403 and api.json()["detail"] == REFUSED
    assert not [p for p in probes if p[0] == "10.9.8.7"]
    # Her own checklist without one runs; an operator's with one measures it.
    assert client.get(f"/migrations/preflight/?vm={vm.pk}&target={hb.pk}&mode=live").status_code == 200
    assert login(operator).get(f"/migrations/preflight/?{query}").status_code == 200
    assert ("10.9.8.7", (22,)) in probes
