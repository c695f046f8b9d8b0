"""Power actions on VMs (start, shut down, force off, reboot) against libvirt's test
driver: scope and permission, refusal during a migration, audit of every outcome.

Each connection to a test:///file.xml URI starts from the file again, so what libvirt did
is read from the state the service stored (read back on the same connection) and from the
audit event, not from a second connection.
"""

import uuid

import pytest
from django.urls import reverse

from hosts import services
from hosts.models import VM
from kvmweb.audit.models import AuditEvent
from migrations_app.models import MigrationJob

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def host(node_xml):
    return services.do_register_host("a", f"test://{node_xml('a')}")


def state(name):
    return VM.objects.get(name=name).state


def successes():
    return AuditEvent.objects.filter(action="vm.power", outcome=AuditEvent.SUCCESS)


def power(client, vm, action):
    return client.post(reverse("hosts:vm_power", args=[vm.pk]), {"action": action, "next": "/vms/"})


def test_it_lets_an_operator_force_off_and_start_a_vm(host, login, operator):
    client = login(operator)
    web = VM.objects.get(name="web1")
    response = power(client, web, "destroy")
    assert response.status_code == 302 and response.url == "/vms/"
    assert state("web1") == "shutoff"
    event = AuditEvent.objects.filter(action="vm.power").latest("id")
    assert event.actor == operator and event.outcome == AuditEvent.SUCCESS
    assert event.target_id == str(web.pk)
    assert event.details == {
        "action": "destroy",
        "host": "a",
        "state_before": "running",
        "state_after": "shutoff",
    }

    db1 = VM.objects.get(name="db1")
    power(client, db1, "start")
    assert state("db1") == "running"
    assert successes().count() == 2
    assert successes().latest("id").details["state_before"] == "shutoff"


def test_it_shuts_down_and_reboots_through_the_service(host, admin):
    web = VM.objects.get(name="web1")
    services.do_vm_power(admin, web, "reboot")
    assert state("web1") == "running"
    services.do_vm_power(admin, web, "shutdown")
    assert state("web1") == "shutoff"  # the test driver's guests obey at once
    assert list(
        AuditEvent.objects.filter(action="vm.power").order_by("id").values_list("details__action", flat=True)
    ) == ["reboot", "shutdown"]


def test_it_refuses_an_action_that_does_not_fit_the_state_libvirt_reports(host, login, operator):
    db1 = VM.objects.get(name="db1")  # shut off in libvirt
    VM.objects.filter(pk=db1.pk).update(state="running")  # a stale inventory says running
    response = power(login(operator), db1, "shutdown")
    assert response.status_code == 302 and not successes().exists()
    event = AuditEvent.objects.filter(action="vm.power").latest("id")
    assert event.outcome == AuditEvent.FAILURE and "shut off" in event.details["error"]
    db1.refresh_from_db()
    assert db1.state == "running"  # nothing was done: the next sync corrects the row


def test_it_lets_owners_power_only_their_own_vms(host, login, alice, bob):
    web = VM.objects.get(name="web1")
    VM.objects.filter(pk=web.pk).update(owner_user=alice)
    assert power(login(bob), web, "destroy").status_code == 404
    assert state("web1") == "running" and not AuditEvent.objects.filter(action="vm.power").exists()
    assert power(login(alice), web, "destroy").status_code == 302
    assert state("web1") == "shutoff"
    assert AuditEvent.objects.get(action="vm.power").actor == alice


def test_it_refuses_auditors_and_outsiders(host, login, auditor, mallory):
    web = VM.objects.get(name="web1")
    assert power(login(auditor), web, "destroy").status_code == 403
    assert power(login(mallory), web, "destroy").status_code == 404
    assert login(auditor).get(reverse("hosts:vm_power", args=[web.pk])).status_code == 405
    assert state("web1") == "running" and not successes().exists()
    with pytest.raises(services.PowerDenied):
        services.do_vm_power(auditor, web, "destroy")
    assert AuditEvent.objects.get(action="vm.power").outcome == AuditEvent.DENIED


def test_it_refuses_power_actions_while_a_migration_runs(host, login, operator):
    web = VM.objects.get(name="web1")
    job = MigrationJob.objects.create(
        vm=web, vm_name=web.name, source=host, source_name=host.name, target=host, target_name=host.name,
        mode=MigrationJob.LIVE, status=MigrationJob.RUNNING, requested_by_name="operator",
    )  # fmt: skip
    client = login(operator)
    response = power(client, web, "destroy")
    assert response.status_code == 302 and state("web1") == "running"
    event = AuditEvent.objects.get(action="vm.power")
    assert event.outcome == AuditEvent.FAILURE and f"#{job.pk}" in event.details["error"]
    page = client.get("/vms/").content.decode()
    assert f"#{job.pk}" in page  # the refusal is shown as a message
    # The list marks the VM as migrating and offers no power buttons for it.
    row = page.split(f'data-vm="{web.pk}"')[1].split("</tr>")[0]
    assert "migrating" in row and 'value="destroy"' not in row
    # A request that only waits for approval does not block power actions.
    MigrationJob.objects.filter(pk=job.pk).update(status=MigrationJob.PENDING_APPROVAL)
    power(client, web, "destroy")
    assert state("web1") == "shutoff" and successes().count() == 1


def test_it_refuses_unknown_actions_and_gone_vms(host, login, operator):
    client = login(operator)
    web = VM.objects.get(name="web1")
    power(client, web, "suspend")
    VM.objects.filter(pk=web.pk).update(gone=True)
    power(client, web, "destroy")
    assert state("web1") == "running"
    outcomes = list(AuditEvent.objects.filter(action="vm.power").values_list("outcome", flat=True))
    assert outcomes == [AuditEvent.FAILURE, AuditEvent.FAILURE]


def test_it_audits_an_unreachable_host_as_a_failure(login, operator, node_xml):
    host = services.do_register_host("a", f"test://{node_xml('a')}")
    vm = VM.objects.create(uuid=uuid.uuid4(), name="ghost", host=host, state="running")
    power(login(operator), vm, "destroy")  # no such domain on the host
    event = AuditEvent.objects.get(action="vm.power")
    assert event.outcome == AuditEvent.FAILURE and event.details["error"]


def test_it_does_not_follow_a_foreign_next_url(host, login, operator):
    web = VM.objects.get(name="web1")
    response = login(operator).post(
        reverse("hosts:vm_power", args=[web.pk]), {"action": "reboot", "next": "https://evil.example/"}
    )
    assert response.url == reverse("hosts:vm_detail", args=[web.pk])


def test_it_offers_power_buttons_on_the_vm_page_to_those_who_may(host, login, operator, auditor):
    web = VM.objects.get(name="web1")
    page = login(operator).get(reverse("hosts:vm_detail", args=[web.pk])).content.decode()
    assert 'form="vm-power"' in page and 'value="reboot"' in page and 'value="start"' not in page
    assert f'formaction="{reverse("hosts:vm_power", args=[web.pk])}"' in page
    page = login(auditor).get(reverse("hosts:vm_detail", args=[web.pk])).content.decode()
    assert 'form="vm-power"' not in page and 'id="vm-power"' not in page
