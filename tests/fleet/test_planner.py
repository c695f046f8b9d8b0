"""The evacuation planner: placement (memory margin, vCPU overcommit, policies,
maintenance, anti-affinity), the mode per VM, the full preflight per VM with its
blockers, and the predicted total at the chosen limits."""

import json

import pytest
from django.core.management import call_command

from fleet.models import VMTag
from fleet.planner import make_plan, place, simulate
from hosts.models import VM
from hosts.services import do_set_maintenance
from migrations_app.preflight import CheckResult
from tests.fleet.conftest import prediction, report


def _by_name(plan_or_rows):
    rows = plan_or_rows.rows if hasattr(plan_or_rows, "rows") else plan_or_rows
    return {r.vm.name: r for r in rows}


def test_it_spreads_vms_instead_of_sending_all_to_one_host(fleet, make_vm, operator):
    for i in range(4):
        make_vm(f"vm{i}", memory_gib=2)
    rows = _by_name(place(VM.objects.filter(host=fleet["ha"]), operator))
    targets = [r.target.name for r in rows.values()]
    assert sorted(targets) == ["hb", "hb", "hc", "hc"]


def test_it_keeps_the_memory_margin_and_says_why_a_vm_stays(fleet, make_vm, operator, settings):
    settings.KVMWEB_FLEET_MEMORY_MARGIN_MIB = 1024
    big = make_vm("big", memory_gib=7.5)  # 8 GiB free - 1 GiB margin = 7 GiB room
    ok = make_vm("small", memory_gib=3)
    rows = _by_name(place([big, ok], operator))
    assert not rows["big"].placed and "not enough free memory" in rows["big"].reasons[0]
    assert {r.split(":")[0] for r in rows["big"].reasons} == {"hb", "hc"}
    assert rows["small"].placed


def test_it_respects_the_vcpu_overcommit_limit(fleet, make_vm, operator, settings):
    settings.KVMWEB_FLEET_VCPU_OVERCOMMIT = 1.0  # 4 CPUs per host: 4 vCPUs each
    make_vm("resident-b", host="hb", vcpus=3)
    make_vm("resident-c", host="hc", vcpus=3)
    wide = make_vm("wide", vcpus=2)
    row = place([wide], operator)[0]
    assert not row.placed and "vCPU" in " ".join(row.reasons)
    # A shut-off VM moved offline does not run there: its vCPUs do not count.
    off = make_vm("off", state=VM.SHUTOFF, vcpus=2)
    row = place([off], operator)[0]
    assert row.placed and row.mode == "offline"


def test_it_never_places_two_vms_sharing_a_tag_on_one_host(fleet, make_vm, operator):
    members = [make_vm(f"db{i}") for i in range(3)]
    for vm in members:
        VMTag.objects.create(vm=vm, name="db-cluster")
    rows = place(members, operator)
    placed = [r for r in rows if r.placed]
    assert len(placed) == 2 and len({r.target.pk for r in placed}) == 2
    stays = next(r for r in rows if not r.placed)
    assert all("anti-affinity tag db-cluster" in reason for reason in stays.reasons)
    # A VM already on a target counts too.
    VMTag.objects.create(vm=make_vm("resident", host="hb"), name="web")
    web = make_vm("web2")
    VMTag.objects.create(vm=web, name="web")
    assert place([web], operator)[0].target == fleet["hc"]


def test_it_never_places_on_a_host_in_maintenance_or_outside_the_policy(fleet, make_vm, operator, alice):
    vm = make_vm("web1")
    do_set_maintenance(fleet["hb"], True, actor=operator)
    assert place([vm], operator)[0].target == fleet["hc"]
    do_set_maintenance(fleet["hc"], True, actor=operator)
    row = place([vm], operator)[0]
    assert not row.placed and "No host is available" in row.reasons[0]
    assert not place([vm], alice)[0].placed  # not hers, and no policy


def test_it_honours_the_persons_row_choices(fleet, make_vm, operator):
    vm = make_vm("web1")
    row = place([vm], operator, overrides={vm.pk: {"target": fleet["hb"].pk, "mode": "cold"}})[0]
    assert row.target == fleet["hb"] and row.mode == "cold"


def test_it_runs_the_full_preflight_for_every_vm_and_picks_the_mode(fleet, make_vm, operator, fake_preflight):
    make_vm("shared")
    make_vm("local")
    make_vm("off", state=VM.SHUTOFF)
    make_vm("stuck")
    local_disk = CheckResult("storage", "Disks", "pass", "copy", details={"disks": [{"shared": False}]})
    fake_preflight.answers["local"] = lambda plan: (
        report(local_disk, prediction(5.0, 80)) if plan.mode == "live" else report(prediction(9.0, 90))
    )
    fake_preflight.answers["stuck"] = lambda plan: report(
        CheckResult("cpu", "CPU", "fail", "no common CPU", remedy="Use host-model")
    )
    plan = make_plan(VM.objects.filter(host=fleet["ha"]), operator, measure_dirty_rate=False)
    rows = _by_name(plan)
    assert (
        rows["shared"].mode == "live" and rows["local"].mode == "live-copy" and rows["off"].mode == "offline"
    )
    assert rows["local"].predicted_seconds == pytest.approx(9.7)  # 9 s + the job overhead
    assert not rows["stuck"].placed and rows["stuck"].remedies == ["Use host-model"]
    assert sorted(set(fake_preflight.calls)) == sorted(
        {
            ("shared", rows["shared"].target.name, "live"),
            ("local", rows["local"].target.name, "live"),
            ("local", rows["local"].target.name, "live-copy"),
            ("off", rows["off"].target.name, "offline"),
            ("stuck", rows["stuck"].target.name, "live"),
        }
    )
    # Smallest predicted first, blocked rows last.
    assert [r.vm.name for r in plan.rows][-1] == "stuck"
    assert plan.rows[0].predicted_seconds <= plan.rows[1].predicted_seconds <= plan.rows[2].predicted_seconds
    # Cold only when allowed.
    plan = make_plan([rows["stuck"].vm], operator, allow_cold=True, measure_dirty_rate=False)
    assert fake_preflight.calls[-1][2] == "cold"


def test_it_predicts_the_total_under_the_limits(fleet, make_vm, operator):
    class R:
        def __init__(self, s, t, seconds):
            self.source, self.target, self.predicted_seconds, self.placed = s, t, seconds, True

    a, b, c = fleet["ha"], fleet["hb"], fleet["hc"]
    rows = [R(a, b, 10), R(a, c, 10), R(a, b, 10), R(a, c, 10)]
    assert simulate(rows, {"max_parallel": 4, "per_source": 2, "per_target": 2}) == 20
    assert simulate(rows, {"max_parallel": 4, "per_source": 4, "per_target": 2}) == 10
    assert simulate(rows, {"max_parallel": 1, "per_source": 4, "per_target": 4}) == 40


def test_it_prints_the_plan_as_json_and_exits_1_when_some_stay(
    fleet, make_vm, admin, fake_preflight, capsys, settings
):
    settings.KVMWEB_FLEET_MEMORY_MARGIN_MIB = 1024
    make_vm("web1")
    make_vm("huge", memory_gib=20)
    with pytest.raises(SystemExit) as exc:
        call_command("evacuate", "ha", "--dry-run", "--json", "--user", "admin")
    assert exc.value.code == 1
    data = json.loads(capsys.readouterr().out)
    rows = {r["vm"]: r for r in data["rows"]}
    assert rows["web1"]["status"] == "ok" and rows["huge"]["status"] == "blocked"
    assert data["placed"] == 1 and data["total_seconds"] > 0
    from fleet.models import Batch

    assert not Batch.objects.exists()  # a dry run changes nothing


def test_it_sets_tags_from_the_command_line_for_operators_only(fleet, make_vm, operator, alice, capsys):
    from django.core.management.base import CommandError

    from kvmweb.audit.models import AuditEvent

    vm = make_vm("db1")
    call_command("vm_tags", "db1", "--add", "db-cluster", "--user", "operator")
    assert list(VMTag.objects.filter(vm=vm).values_list("name", flat=True)) == ["db-cluster"]
    event = AuditEvent.objects.get(action="vm.tags")
    assert event.details == {"before": [], "after": ["db-cluster"]} and event.actor == operator
    vm.owner_user = alice
    vm.save()
    with pytest.raises(CommandError):
        call_command("vm_tags", "db1", "--remove", "db-cluster", "--user", "alice")
    assert VMTag.objects.filter(vm=vm).exists()
