"""The wizard before the checklist: modes that fit the VM's state are preselected and the
others say why; only the chosen mode's options show (data-modes from the schema); a
self-service user without a policy learns what to ask for; a request that will wait for
approval says "Send for approval"; passing checks are folded, the others stay open.

No host is contacted: target ranking and the checklist are replaced by given reports."""

import pytest
from django.urls import reverse

from hosts.models import VM, Host, HostGroup
from kvmweb.accounts.models import SelfServicePolicy
from kvmweb.audit.models import AuditEvent
from migrations_app import preflight
from migrations_app.models import MigrationJob
from migrations_app.preflight import CheckResult, Report


def _report(*results):
    results = list(results) or [CheckResult("connection", "Connections", "pass", "ok")]
    return Report(results=results, verdict=Report.verdict_of(results), started_at="", duration_ms=1)


@pytest.fixture
def world(db, alice, monkeypatch):
    g1, g2 = HostGroup.objects.create(name="g1"), HostGroup.objects.create(name="g2")
    a = Host.objects.create(name="ha", uri="test:///default", group=g1)
    b = Host.objects.create(name="hb", uri="test:///other", group=g2)
    vm = VM.objects.create(
        uuid="6695eb01-f6a4-8304-79aa-97f2502e1950", name="web1", host=a, state="shutoff", owner_user=alice
    )
    ranked = []

    def rank(vm, mode, options, user):
        ranked.append(mode)
        from migrations_app.policy import allowed_targets

        return [(h, _report()) for h in allowed_targets(user, vm)]

    monkeypatch.setattr(preflight, "rank_targets", rank)
    monkeypatch.setattr(preflight, "run_preflight", lambda plan: _report())
    return {"a": a, "b": b, "vm": vm, "g1": g1, "g2": g2, "ranked": ranked}


def test_it_never_preselects_live_for_a_shut_off_vm_and_says_why(world, operator, login):
    client = login(operator)
    vm, b = world["vm"], world["b"]
    page = client.get(reverse("migrations:new"), {"vm": vm.pk, "mode": "live"})
    assert page.context["mode"] == MigrationJob.OFFLINE and world["ranked"] == ["offline"]
    options = client.get(reverse("migrations:new"), {"vm": vm.pk, "target": b.pk, "mode": "live"})
    html = options.content.decode()
    assert options.context["form"].initial["mode"] == "offline"
    assert 'value="offline" data-testid="mode-offline" checked' in html
    assert 'value="live" data-testid="mode-live" disabled' in html
    live = {c.key: c for c in options.context["mode_choices"]}["live"]
    assert not live.fits and "needs a running VM" in live.why and "shut off" in live.why
    assert {c.key for c in options.context["mode_choices"] if c.fits} == {"cold", "offline"}


def test_it_preselects_live_for_a_running_vm_and_marks_offline_unfit(world, operator, login):
    VM.objects.filter(pk=world["vm"].pk).update(state="running")
    options = login(operator).get(reverse("migrations:new"), {"vm": world["vm"].pk, "target": world["b"].pk})
    choices = {c.key: c for c in options.context["mode_choices"]}
    assert options.context["form"].initial["mode"] == "live"
    assert choices["live"].fits and choices["cold"].fits and not choices["offline"].fits


def test_it_tags_each_option_with_the_modes_that_use_it(world, operator, login):
    html = (
        login(operator)
        .get(reverse("migrations:new"), {"vm": world["vm"].pk, "target": world["b"].pk})
        .content.decode()
    )
    assert 'data-option="force_off" data-modes="cold"' in html
    assert 'data-option="bandwidth" data-modes="live live-copy"' in html
    assert "js/wizard.js" in html


def test_it_tells_a_self_service_user_without_a_policy_what_to_ask_for(world, alice, login):
    page = login(alice).get(reverse("migrations:new"), {"vm": world["vm"].pk})
    assert page.status_code == 200 and page.context["ranked"] == []
    text = page.context["no_target_help"]
    assert "No self-service policy covers VMs on hosts of g1" in text and "Ask an administrator" in text
    assert b'data-testid="no-targets-help"' in page.content


def test_it_offers_only_the_policys_modes_and_says_send_for_approval(world, alice, operator, login):
    policy = SelfServicePolicy.objects.create(
        source_group=world["g1"], allowed_modes=["offline"], requires_approval=True
    )
    policy.target_groups.add(world["g2"])
    client = login(alice)
    options = client.get(reverse("migrations:new"), {"vm": world["vm"].pk, "target": world["b"].pk})
    choices = {c.key: c for c in options.context["mode_choices"]}
    assert choices["offline"].fits and not choices["cold"].fits and "policy" in choices["cold"].why
    confirm = client.get(
        reverse("migrations:new"),
        {
            "vm": world["vm"].pk,
            "target": world["b"].pk,
            "mode": "offline",
            "step": "preflight",
            "persist": "on",
        },
    )
    assert confirm.context["step"] == "preflight", confirm.context.get("error")
    assert confirm.context["needs_approval"] and b"Send for approval" in confirm.content
    assert b"Start the migration" not in confirm.content
    assert not AuditEvent.objects.filter(action="migration.request").exists()  # nothing asked yet
    staff = login(operator).get(
        reverse("migrations:new"),
        {
            "vm": world["vm"].pk,
            "target": world["b"].pk,
            "mode": "offline",
            "step": "preflight",
            "persist": "on",
        },
    )
    assert not staff.context["needs_approval"] and b"Start the migration" in staff.content


def test_it_folds_passing_checks_and_keeps_warnings_open(world, operator, login, monkeypatch):
    report = _report(
        CheckResult("connection", "Connections", "pass", "both answer"),
        CheckResult("cpu", "CPU compatibility", "pass", "same CPU"),
        CheckResult("guest_shutdown", "Guest can be shut down", "warn", "no <acpi/>", "Force off"),
    )
    monkeypatch.setattr(preflight, "run_preflight", lambda plan: report)
    html = (
        login(operator)
        .get(
            reverse("migrations:new"),
            {
                "vm": world["vm"].pk,
                "target": world["b"].pk,
                "mode": "cold",
                "step": "preflight",
                "persist": "on",
            },
        )
        .content.decode()
    )
    assert 'data-testid="checks-open"' in html, "the checklist is not shown"
    open_part = html[html.index('data-testid="checks-open"') : html.index('data-testid="checks-passed"')]
    folded = html[html.index('data-testid="checks-passed"') :]
    assert 'id="check-guest_shutdown"' in open_part and 'name="ack" value="guest_shutdown"' in open_part
    assert 'id="check-cpu"' in folded and 'id="check-connection"' in folded
    assert "2 checks passed" in folded and 'id="check-cpu"' not in open_part
