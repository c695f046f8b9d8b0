"""A small inventory for scope and policy tests, built without libvirt.

Host groups prod (host p1-prod-host), dev (host d1-dev-host) and secret (host
s1-secret, never shown to self-service). p1 is libvirt's built-in test:///default, so a
sync of it works without files. Policy: VMs on prod may go to dev, Live only, at most 100 MiB/s, with
approval. VMs: alice-web (alice, on p1), bob-db (bob, on p1), team-app (group team-a,
which alice is in, on d1), hidden (nobody, on s1).
"""

import uuid
from types import SimpleNamespace

from django.contrib.auth.models import Group

from hosts.models import VM, Host, HostGroup
from kvmweb.accounts.models import SelfServicePolicy


def build(alice=None, bob=None):
    prod = HostGroup.objects.create(name="prod")
    dev = HostGroup.objects.create(name="dev")
    secret = HostGroup.objects.create(name="secret")
    p1 = Host.objects.create(name="p1-prod-host", uri="test:///default", group=prod)
    d1 = Host.objects.create(name="d1-dev-host", uri="test:///d1", group=dev)
    s1 = Host.objects.create(name="s1-secret", uri="test:///s1", group=secret)
    policy = SelfServicePolicy.objects.create(
        source_group=prod, allowed_modes=["live"], max_bandwidth=100, requires_approval=True
    )
    policy.target_groups.set([dev])
    team = Group.objects.create(name="team-a")
    if alice is not None:
        alice.groups.add(team)

    def vm(name, host, **owners):
        return VM.objects.create(uuid=uuid.uuid4(), name=name, host=host, state=VM.RUNNING, **owners)

    return SimpleNamespace(
        prod=prod,
        dev=dev,
        secret=secret,
        p1=p1,
        d1=d1,
        s1=s1,
        policy=policy,
        team=team,
        alice_web=vm("alice-web", p1, owner_user=alice),
        bob_db=vm("bob-db", p1, owner_user=bob),
        team_app=vm("team-app", d1, owner_group=team),
        hidden=vm("hidden-vm", s1),
    )
