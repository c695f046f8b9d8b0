"""Migration plans: options, refused combinations, libvirt flags/params, virsh lines."""

import libvirt
import pytest

from hosts.models import VM, Host
from migrations_app.models import MigrationJob
from migrations_app.plan import DEFAULTS, MODES, MigrationPlan, PlanError, parse_options


@pytest.fixture
def pair(db):
    a = Host.objects.create(name="alpha", uri="qemu+tcp://10.0.0.1/system")
    b = Host.objects.create(name="beta", uri="qemu+tcp://10.0.0.2/system")
    vm = VM.objects.create(
        uuid="11111111-2222-3333-4444-555555555501",
        name="web1",
        host=a,
        state=VM.RUNNING,
        persistent=True,
        disks=[{"source": "/var/lib/libvirt/images/web1.qcow2", "device": "disk", "target": "vda"}],
    )
    return a, b, vm


def _plan(pair, mode, **options):
    a, b, vm = pair
    return MigrationPlan(vm=vm, source=a, target=b, mode=mode, options=options)


def test_it_uses_the_job_model_mode_values():
    assert set(MODES) == {value for value, _label in MigrationJob.MODES}


def test_it_normalizes_options_with_defaults_and_drops_what_a_mode_does_not_use():
    live = parse_options("live", {"bandwidth": "64", "auto_converge": "on", "postcopy": "0"})
    assert live["bandwidth"] == 64 and live["auto_converge"] is True and live["postcopy"] is False
    assert live["persist"] is True and live["undefine_source"] is True
    assert "copy_storage" not in live and "shutdown_timeout" not in live
    cold = parse_options("cold", {"bandwidth": 64, "force_off": "yes"})
    assert "bandwidth" not in cold and cold["force_off"] is True and cold["shutdown_timeout"] == 120
    assert parse_options("offline", {}) == {"persist": True, "undefine_source": True}
    assert parse_options("live-copy", {})["copy_storage"] == "all"
    assert set(parse_options("live-copy", {})) <= set(DEFAULTS)


@pytest.mark.parametrize(
    "mode,data,fragment",
    [
        ("teleport", {}, "Unknown migration mode"),
        ("live", {"bandwidth": "fast"}, "whole number"),
        ("live", {"bandwidth": 0}, "between 1"),
        ("live", {"parallel": 1}, "between 2"),
        ("live", {"completion_action": "explode"}, "one of: abort, postcopy"),
        ("live-copy", {"copy_storage": "some"}, "one of: all, inc"),
        ("live", {"migrate_uri": "http://x"}, "tcp://"),
        ("live", {"postcopy": "maybe"}, "yes or no"),
        ("live", {"warp": 9}, "Unknown option"),
    ],
)
def test_it_refuses_bad_options_with_a_reason(mode, data, fragment):
    with pytest.raises(PlanError) as exc:
        parse_options(mode, data)
    assert fragment in str(exc.value)


def test_it_builds_live_flags_peer_to_peer_with_persist_and_undefine(pair):
    plan = _plan(pair, "live")
    assert plan.flag_names() == ["live", "peer2peer", "persist_dest", "undefine_source"]
    assert plan.flags() == (
        libvirt.VIR_MIGRATE_LIVE
        | libvirt.VIR_MIGRATE_PEER2PEER
        | libvirt.VIR_MIGRATE_PERSIST_DEST
        | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    )
    assert plan.params() == {}
    assert plan.virsh_command() == (
        "virsh -c qemu+tcp://10.0.0.1/system migrate --live --p2p --persistent --undefinesource "
        "--verbose web1 qemu+tcp://10.0.0.2/system"
    )


def test_it_maps_every_advanced_option_to_flags_params_and_virsh(pair):
    plan = _plan(
        pair,
        "live",
        bandwidth=100,
        max_downtime=500,
        auto_converge=True,
        compression=True,
        parallel=4,
        postcopy=True,
        completion_timeout=600,
        completion_action="postcopy",
        migrate_uri="tcp://192.0.2.7",
        persist=False,
        undefine_source=False,
    )
    flags = plan.flags()
    for bit in (
        libvirt.VIR_MIGRATE_AUTO_CONVERGE,
        libvirt.VIR_MIGRATE_COMPRESSED,
        libvirt.VIR_MIGRATE_PARALLEL,
        libvirt.VIR_MIGRATE_POSTCOPY,
    ):
        assert flags & bit
    assert not flags & libvirt.VIR_MIGRATE_PERSIST_DEST and not flags & libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    assert plan.params() == {
        libvirt.VIR_MIGRATE_PARAM_BANDWIDTH: 100,
        libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS: 4,
        libvirt.VIR_MIGRATE_PARAM_URI: "tcp://192.0.2.7",
    }
    virsh = plan.virsh_command()
    for part in (
        "--auto-converge",
        "--compressed",
        "--parallel --parallel-connections 4",
        "--postcopy",
        "--bandwidth 100",
        "--timeout 600 --timeout-postcopy",
        "--migrateuri tcp://192.0.2.7",
        "migrate-setmaxdowntime web1 500",
        "migrate-postcopy web1",
    ):
        assert part in virsh
    assert "--persistent" not in virsh and "--undefinesource" not in virsh


def test_it_adds_storage_copy_flags_for_live_copy(pair):
    full = _plan(pair, "live-copy")
    assert full.flags() & libvirt.VIR_MIGRATE_NON_SHARED_DISK
    assert "--copy-storage-all" in full.virsh_command()
    inc = _plan(pair, "live-copy", copy_storage="inc")
    assert (
        inc.flags() & libvirt.VIR_MIGRATE_NON_SHARED_INC
        and not inc.flags() & libvirt.VIR_MIGRATE_NON_SHARED_DISK
    )
    assert "--copy-storage-inc" in inc.virsh_command()


def test_it_uses_offline_persistent_flags_for_offline_and_lists_the_cold_steps(pair):
    a, b, vm = pair
    vm.state = VM.SHUTOFF
    offline = _plan(pair, "offline")
    assert offline.flags() == (
        libvirt.VIR_MIGRATE_OFFLINE | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    )
    assert offline.virsh_command() == (
        "virsh -c qemu+tcp://10.0.0.1/system migrate --offline --persistent --undefinesource web1 "
        "qemu+tcp://10.0.0.2/system"
    )
    vm.state = VM.RUNNING
    cold = _plan(pair, "cold", force_off=True, shutdown_timeout=30)
    steps = cold.virsh_command().splitlines()
    assert steps[0] == "virsh -c qemu+tcp://10.0.0.1/system shutdown web1"
    assert "30 s" in steps[1] and "destroy web1" in steps[1]
    assert any("vol-download /var/lib/libvirt/images/web1.qcow2" in s for s in steps)
    assert "migrate --offline --persistent --undefinesource web1" in steps[-2]
    assert steps[-1] == "virsh -c qemu+tcp://10.0.0.2/system start web1"
    assert cold.options["start_on_target"] is True  # it was running


def test_it_does_not_start_a_cold_moved_vm_that_was_off(pair):
    a, b, vm = pair
    vm.state = VM.SHUTOFF
    plan = _plan(pair, "cold")
    assert plan.options["start_on_target"] is False
    assert "start web1" not in plan.virsh_command()


@pytest.mark.parametrize(
    "mode,state,options,persistent,fragment",
    [
        ("offline", "shutoff", {"persist": False}, True, "requires --persistent"),
        ("live", "shutoff", {}, True, "needs a running VM"),
        ("live-copy", "shutoff", {}, True, "needs a running VM"),
        ("offline", "running", {}, True, "needs a shut-off VM"),
        ("offline", "shutoff", {}, False, "transient"),
        ("cold", "running", {}, False, "transient"),
        ("live", "running", {"tunnelled": True, "parallel": 2}, True, "tunnelled"),
        ("live-copy", "running", {"tunnelled": True}, True, "tunnelled"),
        ("live", "running", {"persist": False, "undefine_source": True}, True, "no definition anywhere"),
        (
            "live",
            "running",
            {"completion_timeout": 60, "completion_action": "postcopy"},
            True,
            "post-copy enabled",
        ),
    ],
)
def test_it_refuses_combinations_libvirt_refuses(pair, mode, state, options, persistent, fragment):
    plan = _plan(pair, mode, **options)
    with pytest.raises(PlanError) as exc:
        plan.validate(state=state, persistent=persistent)
    assert fragment in str(exc.value)


def test_it_refuses_the_source_as_target(pair):
    a, b, vm = pair
    with pytest.raises(PlanError, match="already on"):
        MigrationPlan(vm=vm, source=a, target=a, mode="live").validate()


def test_it_round_trips_through_a_job(pair):
    a, b, vm = pair
    plan = _plan(pair, "live", bandwidth=32)
    job = MigrationJob.objects.create(
        vm=vm,
        vm_name=vm.name,
        source=a,
        source_name=a.name,
        target=b,
        target_name=b.name,
        mode="live",
        options=plan.options,
    )
    again = MigrationPlan.from_job(job)
    assert again.to_dict() == plan.to_dict()
    data = again.to_dict()
    assert data["vm"] == {"id": vm.pk, "uuid": str(vm.uuid), "name": "web1"}
    assert data["flag_names"] == ["live", "peer2peer", "persist_dest", "undefine_source"]
    assert data["params"] == {libvirt.VIR_MIGRATE_PARAM_BANDWIDTH: 32}


def test_it_never_asks_libvirt_for_a_storage_copy_offline(pair):
    # "Offline with storage copy" cannot be planned: the copy is the live-copy mode, and an
    # offline plan drops the copy option (forms submit it for every mode). Disks the target
    # cannot see make the preflight's storage check fail with "choose Cold" instead.
    a, b, vm = pair
    vm.state = VM.SHUTOFF
    plan = _plan(pair, "offline", copy_storage="all")
    assert "copy_storage" not in plan.options
    assert not plan.flags() & (libvirt.VIR_MIGRATE_NON_SHARED_DISK | libvirt.VIR_MIGRATE_NON_SHARED_INC)
    assert "--copy-storage" not in plan.virsh_command()
    assert plan.validate() is True
