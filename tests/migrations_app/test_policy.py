"""The self-service policy: who may request which migration, and what a refusal says."""

import pytest

from hosts.models import Host
from migrations_app import policy
from migrations_app.policy import check_request
from tests.accounts.world import build

pytestmark = pytest.mark.django_db


@pytest.fixture
def world(alice, bob):
    return build(alice, bob)


def test_it_always_allows_staff_roles_without_approval(world, admin, operator):
    for user in (admin, operator):
        decision = check_request(user, world.hidden, world.p1, "cold", {"bandwidth": None})
        assert decision.allowed and not decision.needs_approval and decision.reason == ""


def test_it_never_allows_auditors_or_outsiders(world, auditor, mallory):
    for user in (auditor, mallory):
        decision = check_request(user, world.alice_web, world.d1, "live", {"bandwidth": 50})
        assert not decision.allowed
        assert decision.reason == "Your role does not allow migration requests."


def test_it_allows_a_request_within_policy_and_asks_for_approval(world, alice):
    decision = check_request(alice, world.alice_web, world.d1, "live", {"bandwidth": 100})
    assert decision.allowed and decision.needs_approval
    assert "approval" in decision.reason


def test_it_skips_approval_when_the_policy_does_not_need_it(world, alice):
    world.policy.requires_approval = False
    world.policy.save()
    decision = check_request(alice, world.alice_web, world.d1, "live", {"bandwidth": 10})
    assert decision.allowed and not decision.needs_approval


def test_it_answers_the_same_for_a_foreign_vm_and_a_missing_one(world, alice, bob):
    foreign = check_request(bob, world.alice_web, world.d1, "live", {"bandwidth": 50})
    hidden = check_request(alice, world.hidden, world.d1, "live", {"bandwidth": 50})
    assert not foreign.allowed and not hidden.allowed
    assert foreign.reason == hidden.reason == "That VM is not available to you."
    assert "alice-web" not in foreign.reason and "hidden" not in hidden.reason


def test_it_refuses_targets_outside_policy_without_naming_them(world, alice):
    for target in (world.s1, world.p1, None):
        decision = check_request(alice, world.alice_web, target, "live", {"bandwidth": 50})
        assert not decision.allowed
        assert decision.reason == "That target is not available to you. This VM may move to hosts of: dev."
        assert "secret" not in decision.reason and "s1" not in decision.reason


def test_it_refuses_modes_the_policy_does_not_allow(world, alice):
    decision = check_request(alice, world.alice_web, world.d1, "cold", {"bandwidth": 50})
    assert not decision.allowed
    assert decision.reason == "The mode cold is not allowed for this VM. Allowed: Live."


@pytest.mark.parametrize(
    ("bandwidth", "allowed", "reason"),
    [
        (None, False, "Set a bandwidth limit of at most 100 MiB/s; unlimited is not allowed."),
        (0, False, "Set a bandwidth limit of at most 100 MiB/s; unlimited is not allowed."),
        (101, False, "The bandwidth 101 MiB/s is above the allowed 100 MiB/s."),
        ("fast", False, "bandwidth (MiB/s) must be a whole number, not 'fast'."),
        (100, True, "This request waits for an operator's approval."),
        ("1", True, "This request waits for an operator's approval."),
    ],
)
def test_it_holds_requests_to_the_bandwidth_cap(world, alice, bandwidth, allowed, reason):
    decision = check_request(alice, world.alice_web, world.d1, "live", {"bandwidth": bandwidth})
    assert decision.allowed is allowed and decision.reason == reason


def test_it_keeps_the_explicit_migration_uri_for_operators(world, alice, operator):
    options = {"bandwidth": 50, "migrate_uri": "tcp://10.0.0.99:49152"}
    decision = check_request(alice, world.alice_web, world.d1, "live", options)
    assert not decision.allowed and "migration URI" in decision.reason
    assert check_request(operator, world.alice_web, world.d1, "live", options).allowed


def test_it_allows_unlimited_bandwidth_when_the_policy_has_no_cap(world, alice):
    world.policy.max_bandwidth = None
    world.policy.save()
    assert check_request(alice, world.alice_web, world.d1, "live", {}).allowed


def test_it_refuses_vms_on_hosts_without_a_policy(world, alice):
    # team-app is alice's (through her group) but runs on d1, whose group has no policy.
    decision = check_request(alice, world.team_app, world.p1, "live", {"bandwidth": 10})
    assert not decision.allowed and "No self-service policy covers" in decision.reason
    world.d1.group = None
    world.d1.save()
    decision = check_request(alice, world.team_app, world.p1, "live", {"bandwidth": 10})
    assert not decision.allowed and "No self-service policy covers" in decision.reason


def test_it_shows_self_service_users_their_hosts_and_allowed_targets_only(world, alice, bob, mallory):
    # alice: p1 (alice-web), d1 (team-app, and the allowed target group dev).
    assert set(Host.objects.restrict(alice).values_list("name", flat=True)) == {"p1-prod-host", "d1-dev-host"}
    assert set(Host.objects.restrict(bob).values_list("name", flat=True)) == {"p1-prod-host", "d1-dev-host"}
    assert not Host.objects.restrict(mallory).exists()
    world.policy.target_groups.set([world.dev, world.secret])
    assert "s1-secret" in Host.objects.restrict(bob).values_list("name", flat=True)
    world.bob_db.owner_user = None
    world.bob_db.save()
    assert not Host.objects.restrict(bob).exists()


def test_it_offers_only_allowed_targets_in_the_wizard(world, alice, bob, operator):
    assert list(policy.allowed_targets(alice, world.alice_web)) == [world.d1]
    assert not policy.allowed_targets(bob, world.alice_web).exists()
    assert set(policy.allowed_targets(operator, world.alice_web)) == {world.d1, world.s1}
