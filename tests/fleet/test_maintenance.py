"""Maintenance mode: switched with who, when and why (audited), and a host in
maintenance is never offered or accepted as a target (preflight, ranking, policies,
the request gate, the planner)."""

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from hosts.models import HostGroup
from hosts.services import do_set_maintenance
from kvmweb.accounts.models import SelfServicePolicy
from kvmweb.audit.models import AuditEvent
from migrations_app.plan import MigrationPlan
from migrations_app.policy import allowed_targets, check_request
from migrations_app.preflight import rank_targets, run_preflight
from migrations_app.services import JobError, do_create_job
from tests.fleet.conftest import report


def test_it_records_who_when_and_why_and_audits_both_switches(fleet, operator):
    host = do_set_maintenance(fleet["hb"], True, reason="BIOS update", actor=operator)
    host.refresh_from_db()
    assert host.maintenance and host.maintenance_reason == "BIOS update"
    assert host.maintenance_by == "operator" and host.maintenance_since is not None
    do_set_maintenance(host, False, actor=operator)
    host.refresh_from_db()
    assert not host.maintenance and host.maintenance_since is None and host.maintenance_by == ""
    events = list(AuditEvent.objects.filter(action="host.maintenance").order_by("id"))
    assert [e.details["maintenance"] for e in events] == [True, False]
    assert events[0].actor == operator and events[0].details["reason"] == "BIOS update"


def test_it_switches_from_the_command_line(fleet, admin, capsys):
    call_command("maintenance", "hb", "on", "--reason", "disk swap", "--user", "admin")
    fleet["hb"].refresh_from_db()
    assert fleet["hb"].maintenance and fleet["hb"].maintenance_reason == "disk swap"
    assert "in maintenance since" in capsys.readouterr().out
    with pytest.raises(CommandError, match="no host named") as exc:
        call_command("maintenance", "nosuch", "on", "--user", "admin")
    assert exc.value.returncode == 2


def test_it_is_never_offered_as_a_target(fleet, make_vm, operator, alice, monkeypatch):
    vm = make_vm("web1", memory_gib=1)
    do_set_maintenance(fleet["hb"], True, actor=operator)
    assert set(allowed_targets(operator, vm)) == {fleet["hc"]}
    # Self-service: the policy allows both other hosts' group, maintenance removes one.
    g = HostGroup.objects.create(name="g")
    for h in fleet.values():
        h.group = g
        h.save()
    vm.owner_user = alice
    vm.save()
    SelfServicePolicy.objects.create(source_group=g, allowed_modes=["live"]).target_groups.add(g)
    assert set(allowed_targets(alice, vm)) == {fleet["hc"]}
    monkeypatch.setattr("migrations_app.preflight.run_preflight", lambda plan, **kw: report())
    monkeypatch.setattr("migrations_app.preflight.prime_dirty_rate", lambda vm: None)
    assert [h for h, _r in rank_targets(vm, "offline", user=operator)] == [fleet["hc"]]


def test_it_is_never_accepted_as_a_target(fleet, make_vm, operator, node_xml):
    vm = make_vm("web1")
    do_set_maintenance(fleet["hb"], True, reason="PSU", actor=operator)
    decision = check_request(operator, vm, fleet["hb"], "live", {})
    assert not decision.allowed and "maintenance" in decision.reason
    with pytest.raises(JobError, match="maintenance"):
        do_create_job(vm, fleet["hb"], "live", {}, actor=operator, report=report())
    assert AuditEvent.objects.filter(action="migration.request", outcome=AuditEvent.DENIED).exists()
    # The preflight refuses it too, and an administrator cannot override that.
    a, b = fleet["ha"], fleet["hb"]
    a.uri, b.uri = f"test://{node_xml('a')}", f"test://{node_xml('b')}"
    result = run_preflight(MigrationPlan(vm=vm, source=a, target=b, mode="live")).result("same_host")
    assert result.status == "fail" and not result.overridable and "PSU" in result.message


def test_it_shows_maintenance_on_the_host_pages(fleet, operator, login):
    do_set_maintenance(fleet["hb"], True, reason="kernel upgrade", actor=operator)
    client = login(operator)
    assert "kernel upgrade" in client.get(f"/hosts/{fleet['hb'].pk}/").content.decode()
    page = client.get("/hosts/").content.decode()
    assert page.count("badge maintenance") == 1


def test_it_lets_operators_switch_it_from_the_host_page_but_not_auditors(fleet, operator, auditor, login):
    url = f"/fleet/hosts/{fleet['hb'].pk}/maintenance/"
    assert login(auditor).post(url, {"on": "1", "reason": "x"}).status_code == 403
    fleet["hb"].refresh_from_db()
    assert not fleet["hb"].maintenance
    response = login(operator).post(url, {"on": "1", "reason": "fan"})
    assert response.status_code == 302
    fleet["hb"].refresh_from_db()
    assert fleet["hb"].maintenance and fleet["hb"].maintenance_reason == "fan"
