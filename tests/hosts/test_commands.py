"""add_host and sync_inventory go through the same audited services as the UI."""

import pytest
from django.core.management import CommandError, call_command

from hosts.models import VM, Host
from kvmweb.audit.models import AuditEvent

pytestmark = pytest.mark.django_db


def test_it_registers_a_host_from_the_command_line(node_xml, capsys):
    call_command("add_host", "lab-x", f"test://{node_xml('a')}", "--group", "rack1")
    host = Host.objects.get(name="lab-x")
    assert host.group.name == "rack1" and host.status == Host.REACHABLE
    assert VM.objects.filter(host=host).count() == 3
    assert "reachable, 3 VMs" in capsys.readouterr().out
    assert AuditEvent.objects.filter(action="host.register", target_name="lab-x").exists()


def test_it_refuses_a_malicious_uri_on_the_command_line():
    with pytest.raises(CommandError, match="Parameter 'command' is refused"):
        call_command("add_host", "evil", "qemu+ssh://h/system?command=/bin/sh")
    assert not Host.objects.exists()


def test_it_syncs_named_hosts_and_fails_for_unreachable_ones(node_xml, capsys):
    call_command("add_host", "a", f"test://{node_xml('a')}")
    call_command("add_host", "down", "qemu+tcp://127.0.0.1:1/system", "--no-sync")
    call_command("sync_inventory", "a")
    assert "a: 0 new, 0 moved here, 0 gone" in capsys.readouterr().out
    with pytest.raises(CommandError, match="1 host"):
        call_command("sync_inventory")
    with pytest.raises(CommandError, match="unknown host"):
        call_command("sync_inventory", "nope")
