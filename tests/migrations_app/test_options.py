"""One options schema: a value is accepted or refused with the same words by the wizard
form, `migrate_vm`, `preflight`, the job controls and the self-service policy; a value
the form refuses makes the commands exit 2."""

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from hosts.models import VM, Host, HostGroup
from kvmweb.accounts.models import SelfServicePolicy
from migrations_app import options
from migrations_app.forms import BandwidthForm, OptionsForm
from migrations_app.models import MigrationJob
from migrations_app.options import OptionError
from migrations_app.plan import PlanError, parse_options
from migrations_app.policy import check_request
from migrations_app.services import JobError, do_set_bandwidth

NEGATIVE = "bandwidth (MiB/s) must be between 1 and 1000000."


@pytest.fixture
def pair(db, alice):
    dev = HostGroup.objects.create(name="dev")
    a = Host.objects.create(name="ha", uri="test:///default")
    b = Host.objects.create(name="hb", uri="test:///other", group=dev)
    vm = VM.objects.create(
        uuid="6695eb01-f6a4-8304-79aa-97f2502e193f", name="web1", host=a, state="shutoff", owner_user=alice
    )
    return {"a": a, "b": b, "vm": vm, "dev": dev}


def test_it_refuses_a_negative_bandwidth_with_the_same_words_everywhere(pair, admin):
    form = OptionsForm({"mode": "offline", "bandwidth": "-1"})
    assert not form.is_valid() and form.errors["bandwidth"] == [NEGATIVE]
    with pytest.raises(PlanError, match=NEGATIVE.replace("(", r"\(").replace(")", r"\)")):
        parse_options("offline", {"bandwidth": -1})
    for command, args in (
        ("migrate_vm", ["web1", "hb", "--mode", "offline", "--bandwidth", "-1", "--user", "admin"]),
        ("preflight", ["web1", "hb", "--mode", "offline", "--bandwidth", "-1"]),
    ):
        with pytest.raises(CommandError) as exc:
            call_command(command, *args)
        assert exc.value.returncode == 2 and str(exc.value) == NEGATIVE, command
    assert not MigrationJob.objects.exists()  # nothing was queued
    assert BandwidthForm({"bandwidth": "-5"}).errors["bandwidth"] == [NEGATIVE]
    job = MigrationJob.objects.create(
        vm=pair["vm"], source=pair["a"], target=pair["b"], mode="live", status=MigrationJob.RUNNING
    )
    with pytest.raises(JobError, match="must be between 1 and 1000000"):
        do_set_bandwidth(job, -5, admin)
    assert options.clean_control("bandwidth", "0") == 0  # 0 = unlimited, for a running job only


def test_it_exits_2_for_a_target_that_is_the_vms_own_host(pair):
    with pytest.raises(CommandError) as exc:
        call_command("preflight", "web1", "ha", "--mode", "offline")
    assert exc.value.returncode == 2 and "already on" in str(exc.value)


def test_it_does_not_apply_a_bandwidth_cap_to_cold_and_offline_requests(pair, alice):
    prod = HostGroup.objects.create(name="prod")
    Host.objects.filter(pk=pair["a"].pk).update(group=prod)
    pair["vm"].host.refresh_from_db()
    policy = SelfServicePolicy.objects.create(
        source_group=prod,
        allowed_modes=["live", "cold", "offline"],
        max_bandwidth=50,
        requires_approval=False,
    )
    policy.target_groups.add(pair["dev"])
    for mode in ("cold", "offline"):
        assert check_request(alice, pair["vm"], pair["b"], mode, {}).allowed, mode
    live = check_request(alice, pair["vm"], pair["b"], "live", {})
    assert not live.allowed and "unlimited is not allowed" in live.reason
    above = check_request(alice, pair["vm"], pair["b"], "live", {"bandwidth": 80})
    assert not above.allowed and "above the allowed 50" in above.reason
    bad = check_request(alice, pair["vm"], pair["b"], "live", {"bandwidth": "-3"})
    assert not bad.allowed and bad.reason == NEGATIVE


def test_it_derives_every_mode_key_list_from_the_schema():
    assert options.MODE_KEYS["offline"] == {"persist", "undefine_source"}
    assert "start_on_target" in options.MODE_KEYS["cold"] and "bandwidth" not in options.MODE_KEYS["cold"]
    assert set(OptionsForm.base_fields) == {"mode"} | set(options.SCHEMA)


def test_it_refuses_a_migration_uri_whose_port_is_not_a_port():
    """The checklist reads the URI's port to probe it: a port out of range or not a number
    is refused with the schema's words, not a crash of two checks ("The check itself
    failed: Port out of range")."""
    clean = options.SCHEMA["migrate_uri"].clean
    assert clean("tcp://10.0.0.2:49152") == "tcp://10.0.0.2:49152" and clean("tcp://10.0.0.2")
    for bad in ("tcp://10.0.0.2:99999", "tcp://10.0.0.2:port"):
        with pytest.raises(OptionError, match="must look like tcp://ADDRESS"):
            clean(bad)
    with pytest.raises(PlanError, match="must look like tcp://ADDRESS"):
        parse_options("live", {"migrate_uri": "tcp://10.0.0.2:99999"})
