"""Power actions on a real QEMU guest of the lab, through the VM list's service: force off
stops it, start boots it again (its RAM counter runs anew), reboot keeps it running."""

import pytest

from hosts import services
from hosts.models import VM
from kvmweb.audit.models import AuditEvent

pytestmark = pytest.mark.lab


@pytest.mark.django_db
def test_it_forces_off_and_starts_a_lab_guest(lab, lab_guest, operator):
    guest = lab_guest("lab-power")
    host = services.do_register_host("lab-a", lab.uri("lab-a"))
    vm = VM.objects.get(uuid=guest.uuid)
    assert vm.host == host and vm.state == "running"

    services.do_vm_power(operator, vm, "destroy")
    assert lab.conn("lab-a").lookupByUUIDString(guest.uuid).state()[0] == 5  # VIR_DOMAIN_SHUTOFF
    vm.refresh_from_db()
    assert vm.state == "shutoff"

    services.do_vm_power(operator, vm, "start")
    assert lab.conn("lab-a").lookupByUUIDString(guest.uuid).state()[0] == 1  # VIR_DOMAIN_RUNNING
    lab.wait_counter_moves("lab-a", guest.name)  # the guest really runs again
    vm.refresh_from_db()
    assert vm.state == "running"

    # A second start is refused from libvirt's own answer, and audited as a failure.
    with pytest.raises(services.PowerError):
        services.do_vm_power(operator, vm, "start")
    outcomes = list(
        AuditEvent.objects.filter(action="vm.power").order_by("id").values_list("outcome", flat=True)
    )
    assert outcomes == [AuditEvent.SUCCESS, AuditEvent.SUCCESS, AuditEvent.FAILURE]
