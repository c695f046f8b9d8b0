"""The permission matrix: every URL of the project x every persona, asserted cell by cell.

The expected status of a cell comes from the scope rule, written here by hand from
docs/architecture.md and docs/security.md (not computed from the code under test):

    anonymous -> 302 to the sign-in page (public routes excepted)
    object outside the persona's scope -> 404 (nobody learns it exists)
    in scope, without the right -> 403
    otherwise -> the route's success status

SCOPE says who may see each object of the test world; each Route says who holds the
right for GET and for POST. Every POST cell also checks the database: a refused cell
changed nothing and wrote no success audit event; an allowed one wrote its audit event,
by that persona. Every 200 response is searched for the names of the objects outside the
persona's scope (a list, a target choice or an error message must not leak them).

test_it_covers_every_url walks the URL resolver: a new view that is not in ROUTES (or in
EXEMPT with a reason) fails the suite, so no view escapes the matrix.
"""

import asyncio
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from django.contrib.auth.models import Group, User
from django.db import transaction
from django.urls import URLPattern, URLResolver, get_resolver, reverse

from api.models import ApiToken
from fleet.models import Batch, Blackout, VMTag
from hosts.models import VM, Host, HostGroup
from kvmweb.accounts.models import SelfServicePolicy
from kvmweb.accounts.roles import AUDITOR
from kvmweb.audit import record
from kvmweb.audit.models import AuditEvent
from migrations_app.models import JobEvent, LeftCopy, MigrationJob
from notifications.models import InboxMark, Subscription
from tests.accounts.world import build

pytestmark = pytest.mark.django_db

PERSONAS = ("anon", "admin", "operator", "auditor", "alice", "bob", "mallory")
SIGNED_IN = frozenset(PERSONAS) - {"anon"}
STAFF = frozenset({"admin", "operator", "auditor"})
ADMIN = frozenset({"admin"})
MIGRATORS = frozenset({"admin", "operator"})
REQUESTERS = frozenset({"admin", "operator", "alice", "bob"})  # add_migrationjob
CANCELLERS = REQUESTERS  # cancel_migrationjob (self-service: their own jobs)
NOBODY = frozenset()

# Who may see each object of the world (besides these: nobody).
SCOPE = {
    "vm_alice": STAFF | {"alice"},  # owned by alice
    "vm_hidden": STAFF,  # owned by nobody, on the secret host
    "vm_bob": STAFF | {"bob"},  # owned by bob, on p1, no job yet
    "vm_team": STAFF | {"alice"},  # owned by alice's group, on d1 (no policy covers dev)
    "host_p1": STAFF | {"alice", "bob"},  # their VMs run there
    "host_d1": STAFF | {"alice", "bob"},  # allowed target (prod -> dev); alice's team VM runs there
    "host_s1": STAFF,  # secret group: no self-service policy reaches it
    "job_alice": STAFF | {"alice"},  # migration request for alice's VM
    "job_hidden": STAFF,
    "job_alice_run": STAFF | {"alice"},  # a running live migration of alice's VM
    "job_hidden_run": STAFF,
    "job_alice_cold": STAFF | {"alice"},  # a cold move of alice's VM waiting for the shutdown
    "job_hidden_cold": STAFF,
    # alice's VM came from the secret host before it was hers: she sees the job, but
    # not the host's name or anything's URI (migrations_app/masking.py).
    "job_alice_past": STAFF | {"alice"},
    "event_alice": STAFF | {"alice"},  # an event alice caused
    "event_admin": STAFF,
    "group_prod": STAFF,
    "policy_prod": STAFF,
    "user_bob": STAFF | {"bob"},  # an account: staff see all, everyone else only their own
    "copy_bob": STAFF,  # a disk copy left behind: host and path are staff-only facts
    "copy_team": STAFF,
    "token_bob": frozenset({"bob"}),  # an API token: only its owner sees it, administrators too not
    "sub_bob": frozenset({"admin", "bob"}),  # bob's notification subscription (administrators see all)
    "batch_run": STAFF,  # batches (fleet): operators and administrators run them, staff see them
    "batch_paused": STAFF,
    "batch_done": STAFF,
}
# Names that must never appear in a page shown to a persona outside their scope.
NAMES = {
    "vm_alice": "alice-web",
    "vm_bob": "bob-db",
    "vm_team": "team-app",
    "vm_hidden": "hidden-vm",
    "host_s1": "s1-secret",
    "vm_hidden_run": "hidden-run",
    "uri_p1": "test:///default",  # a libvirt URI: administrators only
    "uri_s1": "node-s1.xml",  # the secret host's URI (a test-driver file)
}
NAME_SCOPE = {
    "vm_alice": STAFF | {"alice"},
    "vm_bob": STAFF | {"bob"},
    "vm_team": STAFF | {"alice"},
    "vm_hidden": STAFF,
    "host_s1": STAFF,
    "vm_hidden_run": STAFF,
    "uri_p1": ADMIN,
    "uri_s1": ADMIN,
}


@dataclass(frozen=True)
class Route:
    """One URL name and what the scope rule says about it."""

    name: str
    objects: tuple = (None,)  # world keys for the URL's object (None: no object)
    get: frozenset | None = None  # personas with the right for GET; None: GET refused (405)
    post: frozenset | None = None  # personas with the right for POST; None: not tested
    data: object = None  # (world, object or None) -> POST data
    action: str = ""  # the audit action an allowed POST writes (success)
    public: bool = False  # no sign-in needed
    get_ok: int = 200
    post_ok: int = 302
    query: object = None  # world -> GET query dict
    kwarg: str = "pk"
    param: str = ""  # the object goes in this query/POST field instead of the URL
    perm_first: bool = False  # the page checks the right before looking at the object
    post_objects: tuple | None = None  # objects for POST cells (default: objects)
    overrides: dict = field(default_factory=dict)  # (obj, method, persona) -> status, why in notes
    lists: tuple = ()  # NAMES keys a 200 page must show to those who see them (not empty)
    notes: str = ""


def _roles_data(w, obj):
    return {"roles": [AUDITOR], "active": "on"}


def _owner_data(w, obj):
    return {"owner_user": str(w.people["bob"].pk), "owner_group": "none"}


def _bulk_owner_data(w, obj):
    return {"vm": [w.alice_web.pk, w.hidden.pk], "owner_user": str(w.people["bob"].pk), "owner_group": "keep"}


def _group_data(w, obj):
    return {"name": "edge-group", "description": "", "hosts": [w.p1.pk]}


def _policy_data(source):
    def data(w, obj):
        return {
            "source_group": getattr(w, source).pk,
            "target_groups": [w.dev.pk],
            "allowed_modes": ["live"],
            "max_bandwidth": "50",
            "requires_approval": "on",
        }

    return data


def _host_add_data(w, obj):
    return {"name": "new-host", "uri": w.node_uri, "description": ""}


def _host_edit_data(w, host):
    return {"name": f"{host.name}-renamed", "uri": host.uri, "group": w.prod.pk, "description": "edited"}


def _wizard_data(w, vm):
    target = w.p1 if vm.host_id == w.d1.pk else w.d1
    return {"target": target.pk, "mode": "live", "options": '{"bandwidth": 50}'}


ROUTES = [
    # Site
    Route("dashboard", get=SIGNED_IN),
    Route("login", get=frozenset(PERSONAS), public=True),
    Route("logout", post=frozenset(PERSONAS), public=True, notes="ends the session; audited in test_signin"),
    Route(
        "health",
        get=frozenset(PERSONAS),
        public=True,
        query=lambda w, obj: {"scope": "web"},
        notes="anonymous by design; the plain URL is 503 without running workers",
    ),
    Route("favicon", get=frozenset(PERSONAS), public=True, get_ok=301, notes="redirect to the static icon"),
    # Hosts and VMs
    Route("hosts:list", get=SIGNED_IN, lists=("host_s1",)),
    Route("hosts:add", get=ADMIN, post=ADMIN, data=_host_add_data, action="host.register"),
    Route("hosts:detail", objects=("host_p1", "host_s1"), get=SIGNED_IN),
    # The add-host wizard's "Test connection" is a GET that changes nothing. Its two POSTs
    # write kvmweb's known_hosts file (not rows) and fail on the matrix's test:// hosts;
    # their 403/404 cells and audit events are in tests/hosts/test_ssh_hostkeys.py.
    Route("hosts:connect", get=ADMIN),
    Route("hosts:host_key_confirm"),
    Route("hosts:host_key_replace", objects=("host_p1", "host_s1")),
    Route(
        "hosts:edit",
        objects=("host_p1", "host_s1"),
        get=ADMIN,
        post=ADMIN,
        data=_host_edit_data,
        action="host.change",
    ),
    # A host's TLS certificate page (its POST on test:// hosts is a refusal; the upload,
    # its audit and refusals are in tests/hosts/test_certificates.py).
    Route("hosts:certificate", objects=("host_p1", "host_s1"), get=ADMIN),
    Route("hosts:certificate_new", get=ADMIN),
    Route("hosts:remove", objects=("host_p1", "host_s1"), post=ADMIN, action="host.remove"),
    Route("hosts:sync", objects=("host_p1", "host_s1"), post=MIGRATORS, action="inventory.sync"),
    Route("hosts:vm_list", get=SIGNED_IN, lists=("vm_alice", "vm_bob", "vm_team", "vm_hidden")),
    Route("hosts:vm_detail", objects=("vm_alice", "vm_hidden"), get=SIGNED_IN),
    Route(
        "hosts:vm_power",
        objects=("vm_alice", "vm_hidden"),
        post=REQUESTERS,  # hosts.power_vm: the same roles; self-service only in scope
        data=lambda w, vm: {"action": "destroy"},
        action="vm.power",
        notes="libvirt is replaced by a fake in the world (the matrix tests access)",
    ),
    # Accounts: users, ownership, host groups, policies, approvals
    Route("accounts:users", get=ADMIN | {"auditor"}),
    Route(
        "accounts:user_add",
        get=ADMIN,
        post=ADMIN,
        data=lambda w, obj: {"username": "carol", "password": "a long enough passphrase 42"},
        action="user.create",
    ),
    Route(
        "accounts:user_roles",
        objects=("user_bob",),
        get=ADMIN,
        post=ADMIN,
        data=_roles_data,
        action="user.roles",
    ),
    Route(
        "accounts:user_unlock",
        objects=("user_bob",),
        post=ADMIN,
        action="auth.unlock",
        notes="clears failed sign-ins: its state is the audit event (db_state counts them)",
    ),
    Route(
        "hosts:bulk_owner",
        get=ADMIN,
        post=ADMIN,
        data=_bulk_owner_data,
        action="vm.owner",
        lists=("vm_alice", "vm_bob", "vm_hidden"),
    ),
    Route(
        "hosts:vm_owner",
        objects=("vm_alice", "vm_hidden"),
        get=ADMIN,
        post=ADMIN,
        data=_owner_data,
        action="vm.owner",
    ),
    Route("hosts:groups", get=STAFF),
    Route("hosts:group_add", get=ADMIN, post=ADMIN, data=_group_data, action="hostgroup.create"),
    Route(
        "hosts:group_edit",
        objects=("group_prod",),
        get=ADMIN,
        post=ADMIN,
        data=_group_data,
        action="hostgroup.change",
    ),
    Route("hosts:group_delete", objects=("group_prod",), post=ADMIN, action="hostgroup.delete"),
    Route(
        "migrations:policy_add", get=ADMIN, post=ADMIN, data=_policy_data("secret"), action="policy.create"
    ),
    Route(
        "migrations:policy_edit",
        objects=("policy_prod",),
        get=ADMIN,
        post=ADMIN,
        data=_policy_data("prod"),
        action="policy.change",
    ),
    Route("migrations:policy_delete", objects=("policy_prod",), post=ADMIN, action="policy.delete"),
    Route("migrations:approvals", get=MIGRATORS, lists=("vm_alice", "vm_hidden")),
    Route(
        "migrations:approve", objects=("job_alice", "job_hidden"), post=MIGRATORS, action="migration.approve"
    ),
    Route(
        "migrations:reject",
        objects=("job_alice", "job_hidden"),
        post=MIGRATORS,
        data=lambda w, job: {"reason": "not now"},
        action="migration.reject",
    ),
    # Migrations: wizard, jobs, controls
    Route(
        "migrations:new",
        objects=(None, "vm_bob", "vm_team", "vm_hidden"),
        post_objects=("vm_bob", "vm_team"),
        param="vm",
        get=REQUESTERS,
        post=REQUESTERS,
        perm_first=True,
        data=_wizard_data,
        action="migration.request",
        overrides={("vm_team", "POST", "alice"): 400},
        notes="the wizard checks the right to migrate first (403 for any VM, so nothing "
        "leaks); alice's team VM runs in a group without a policy: refused with the reason",
    ),
    Route("migrations:list", get=SIGNED_IN, lists=("vm_alice", "vm_hidden", "vm_hidden_run")),
    Route(
        "migrations:detail",
        objects=("job_alice", "job_hidden", "job_alice_past"),
        get=SIGNED_IN,
        notes="job_alice_past: moved from the secret host; its name and the URIs are masked",
    ),
    Route(
        "migrations:cancel", objects=("job_alice", "job_hidden"), post=CANCELLERS, action="migration.cancel"
    ),
    Route(
        "migrations:bandwidth",
        objects=("job_alice_run", "job_hidden_run"),
        post=MIGRATORS,
        data=lambda w, job: {"bandwidth": "20"},
        action="migration.bandwidth",
    ),
    Route(
        "migrations:downtime",
        objects=("job_alice_run", "job_hidden_run"),
        post=MIGRATORS,
        data=lambda w, job: {"downtime": "500"},
        action="migration.downtime",
    ),
    Route(
        "migrations:postcopy",
        objects=("job_alice_run", "job_hidden_run"),
        post=MIGRATORS,
        action="migration.postcopy",
    ),
    Route(
        "migrations:force_off",
        objects=("job_alice_cold", "job_hidden_cold"),
        post=MIGRATORS,
        action="migration.force_off",
        notes="operators, or the VM's owner when the policy covering it allows cold moves "
        "(the world's policy does not): 403 for alice",
    ),
    Route(
        "migrations:left_copy_delete",
        objects=("copy_bob", "copy_team"),
        post=MIGRATORS,
        action="leftcopy.delete",
    ),
    Route(
        "migrations:preflight_check",
        objects=(None, "vm_bob", "vm_hidden"),
        param="vm",
        get=REQUESTERS,
        query=lambda w, vm: {"target": w.d1.pk, "mode": "live"} if vm is not None else {},
        notes="dry run: read-only",
    ),
    # Maintenance and batches (fleet)
    Route(
        "fleet:maintenance",
        objects=("host_p1", "host_s1"),
        post=MIGRATORS,
        data=lambda w, host: {"on": "1", "reason": "firmware"},
        action="host.maintenance",
    ),
    Route("fleet:evacuate", objects=("host_p1", "host_s1"), get=MIGRATORS, notes="POST plans: tests/fleet"),
    Route("fleet:bulk", get=MIGRATORS, notes="POST plans: tests/fleet"),
    Route("fleet:list", get=SIGNED_IN, notes="self-service users and mallory see an empty list"),
    Route("fleet:batch", objects=("batch_run", "batch_done"), get=SIGNED_IN),
    Route("fleet:batch_live", objects=("batch_run", "batch_done"), get=SIGNED_IN),
    Route("fleet:pause", objects=("batch_run",), post=MIGRATORS, action="batch.pause"),
    Route("fleet:resume", objects=("batch_paused",), post=MIGRATORS, action="batch.resume"),
    Route("fleet:cancel", objects=("batch_run",), post=MIGRATORS, action="batch.cancel"),
    Route("fleet:move_back", objects=("batch_done",), post=MIGRATORS, action="batch.plan"),
    # Audit history
    Route("audit:list", get=STAFF, lists=("vm_alice", "vm_hidden")),
    Route("audit:detail", objects=("event_alice", "event_admin"), get=STAFF),
    Route("audit:export_csv", get=STAFF),
    Route("audit:export_json", get=STAFF),
    # API tokens (the user's own page) and /metrics
    Route(
        "apitokens:list",
        get=SIGNED_IN,
        post=SIGNED_IN,
        post_ok=200,
        data=lambda w, obj: {"name": "ci script", "expires_days": "30"},
        action="api.token.create",
        notes="renders the new token once (no redirect: the text exists only in that answer)",
    ),
    Route("apitokens:revoke", objects=("token_bob",), post=frozenset({"bob"}), action="api.token.revoke"),
    Route(
        "metrics",
        get=frozenset(PERSONAS),
        public=True,
        notes="open to loopback (the test client is 127.0.0.1); remote callers and tokens: "
        "tests/api/test_metrics.py",
    ),
    # Notification subscriptions
    Route(
        "notifications:list",
        get=SIGNED_IN,
        post=SIGNED_IN,
        data=lambda w, obj: {
            "name": "mine",
            "kind": "email",
            "target": "me@example.com",
            "events": ["job.failed"],
        },
        action="notification.subscribe",
        notes="anyone signed in may subscribe by email; events are filtered by the owner's scope",
    ),
    Route("notifications:detail", objects=("sub_bob",), get=frozenset({"admin", "bob"})),
    Route(
        "notifications:delete",
        objects=("sub_bob",),
        post=frozenset({"admin", "bob"}),
        action="notification.unsubscribe",
    ),
    Route(
        "notifications:bell",
        get=SIGNED_IN,
        notes="the header's bell: each user's own notifications, scoped like the job pages",
    ),
    Route(
        "notifications:mark_read",
        post=SIGNED_IN,
        data=lambda w, obj: {"up_to": "1000000"},
        action="notifications.read",
    ),
]

# URL names deliberately outside the matrix, each with its reason.
EXEMPT_PREFIXES = {}
EXEMPT = {
    "set_language": "Django's language switch: stores a cookie, reads and changes no data",
    "accounts:theme": "the signed-in user's own colour theme (like the language switch): changes "
    "nothing anyone else sees, not audited; tested in tests/accounts/test_theme.py",
    "hosts:ssh_key": "writes kvmweb's SSH key file, not the database (the matrix compares rows); "
    "administrators only (hosts.add_host), audited: tested in tests/hosts/test_ssh_identity.py",
}


# ----------------------------------------------------------------------------- the world


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def clean_report(plan, **kwargs):
    """The checklist with nothing blocking: the matrix tests access, not the checks."""
    from migrations_app.preflight import Report

    return Report(results=[], verdict="pass", started_at="", duration_ms=0, plan={})


@pytest.fixture
def world(admin, operator, auditor, alice, bob, mallory, tmp_path, monkeypatch):
    from migrations_app import preflight, preflight_views, runner

    # Patched where it is looked up too: a module that imported the name while the patch
    # was active would otherwise keep the fake for the rest of the test session.
    monkeypatch.setattr(preflight, "run_preflight", clean_report)
    monkeypatch.setattr(preflight_views, "run_preflight", clean_report)
    monkeypatch.setattr(runner, "run_preflight", clean_report)
    from hosts import services as host_services

    monkeypatch.setattr(host_services, "_power_call", lambda uri, vm_uuid, action: ("running", "shutoff"))
    # Jobs are queued on commit; these tests never commit, so no worker is involved.
    w = build(alice, bob)
    w.people = {
        "anon": None,
        "admin": admin,
        "operator": operator,
        "auditor": auditor,
        "alice": alice,
        "bob": bob,
        "mallory": mallory,
    }
    nodes = []
    for name in ("new", "s1"):
        nodes.append(tmp_path / f"node-{name}.xml")
        shutil.copy(Path(__file__).parent / "data" / "testnode.xml", nodes[-1])
    w.node_uri = f"test://{nodes[0]}"  # for hosts:add
    # The secret host is a working test-driver host, so syncing it is a real success.
    Host.objects.filter(pk=w.s1.pk).update(uri=f"test://{nodes[1]}")
    w.s1.refresh_from_db()

    def job(vm, user):
        return MigrationJob.objects.create(
            vm=vm,
            vm_name=vm.name,
            source=vm.host,
            source_name=vm.host.name,
            target=w.d1,
            target_name=w.d1.name,
            mode=MigrationJob.LIVE,
            options={"bandwidth": 50},
            status=MigrationJob.PENDING_APPROVAL,
            requested_by=user,
            requested_by_name=user.get_username(),
        )

    w.job_alice = job(w.alice_web, alice)
    w.job_hidden = job(w.hidden, admin)

    def running(name, host, owner):
        vm = VM.objects.create(uuid=uuid.uuid4(), name=name, host=host, state=VM.RUNNING, owner_user=owner)
        j = job(vm, admin)
        MigrationJob.objects.filter(pk=j.pk).update(
            status=MigrationJob.RUNNING, options={"bandwidth": 50, "postcopy": True}
        )
        j.refresh_from_db()
        return j

    w.job_alice_past = MigrationJob.objects.create(
        vm=w.alice_web,
        vm_name=w.alice_web.name,
        mode=MigrationJob.LIVE,
        requested_by=admin,
        requested_by_name=admin.get_username(),
        source=w.s1,
        source_name=w.s1.name,
        target=w.p1,
        target_name=w.p1.name,
        status=MigrationJob.SUCCEEDED,
        error=f"warning: {w.s1.uri} was slow to answer",
        preflight={
            "verdict": "pass",
            "plan": {
                "virsh": f"virsh -c {w.s1.uri} migrate --live alice-web {w.p1.uri}",
                "source": {"name": w.s1.name, "uri": w.s1.uri},
                "target": {"name": w.p1.name, "uri": w.p1.uri},
            },
            "results": [
                {
                    "id": "connection",
                    "title": "Connections",
                    "status": "pass",
                    "message": f"{w.s1.name} and {w.p1.name} answer",
                    "details": {"source": {"host": w.s1.name, "uri": w.s1.uri}},
                }
            ],
        },
    )
    JobEvent.objects.create(job_id=w.job_alice_past.pk, message=f"Connected to {w.s1.name} ({w.s1.uri}).")
    # A coded line: its parameters carry the host name and libvirt's words (the URI) too.
    JobEvent.objects.create(
        job_id=w.job_alice_past.pk,
        code="sync_failed",
        params={"host": w.s1.name, "error": f"cannot connect to {w.s1.uri}"},
        message=f"Could not read the inventory of {w.s1.name}: cannot connect to {w.s1.uri}",
    )
    w.job_alice_run = running("alice-run", w.p1, alice)
    w.job_hidden_run = running("hidden-run", w.s1, None)

    def shutting_down(name, host, owner):
        """A cold move waiting for its guest to shut down ("Force off now" applies)."""
        j = running(name, host, owner)
        MigrationJob.objects.filter(pk=j.pk).update(mode=MigrationJob.COLD, options={}, phase="shutdown")
        j.refresh_from_db()
        return j

    w.job_alice_cold = shutting_down("alice-cold", w.p1, alice)
    w.job_hidden_cold = shutting_down("hidden-cold", w.s1, None)
    from api.services import do_create_token

    w.token_bob = do_create_token(bob, "bob's script", actor=bob)[0]
    from notifications.services import do_subscribe

    w.sub_bob = do_subscribe(
        bob, name="bob's mail", kind="email", target="bob@example.com", events=["job.failed"]
    )
    with transaction.atomic():
        w.event_alice = record("test.by_alice", actor=alice, target=w.alice_web)
        w.event_admin = record("test.by_admin", actor=admin, target=w.hidden)

    def batch(status):
        return Batch.objects.create(host=w.p1, host_name=w.p1.name, status=status, created_by=admin)

    w.objects = {
        "batch_run": batch(Batch.RUNNING),
        "batch_paused": batch(Batch.PAUSED),
        "batch_done": batch(Batch.SUCCEEDED),
        "vm_alice": w.alice_web,
        "vm_hidden": w.hidden,
        "host_p1": w.p1,
        "host_d1": w.d1,
        "host_s1": w.s1,
        "job_alice": w.job_alice,
        "job_hidden": w.job_hidden,
        "job_alice_run": w.job_alice_run,
        "job_hidden_run": w.job_hidden_run,
        "job_alice_cold": w.job_alice_cold,
        "job_hidden_cold": w.job_hidden_cold,
        "job_alice_past": w.job_alice_past,
        "vm_bob": w.bob_db,
        "vm_team": w.team_app,
        "event_alice": w.event_alice,
        "event_admin": w.event_admin,
        "group_prod": w.prod,
        "policy_prod": w.policy,
        "user_bob": bob,
        # bob's VM (no active job: a copy of a VM being migrated may not be deleted)
        "copy_bob": LeftCopy.objects.create(vm=w.bob_db, host=w.s1, host_name=w.s1.name, path="/srv/b.qcow2"),
        "copy_team": LeftCopy.objects.create(
            vm=w.team_app, host=w.p1, host_name=w.p1.name, path="/srv/t.qcow2"
        ),
        "token_bob": w.token_bob,
        "sub_bob": w.sub_bob,
    }
    return w


def db_state():
    """Everything a state-changing view could touch, as comparable values."""
    return {
        "hosts": list(Host.objects.order_by("pk").values()),
        "vms": list(VM.objects.order_by("pk").values()),
        "groups": list(HostGroup.objects.order_by("pk").values()),
        "policies": [
            (p.as_dict(), p.pk)
            for p in SelfServicePolicy.objects.order_by("pk").prefetch_related("target_groups")
        ],
        "jobs": list(MigrationJob.objects.order_by("pk").values()),
        "left_copies": list(LeftCopy.objects.order_by("pk").values()),
        "batches": list(Batch.objects.order_by("pk").values()),
        "vm_tags": list(VMTag.objects.order_by("pk").values_list("vm_id", "name")),
        "blackouts": list(Blackout.objects.order_by("pk").values()),
        "users": list(User.objects.order_by("pk").values_list("username", "is_active", "password")),
        "memberships": list(User.groups.through.objects.order_by("pk").values_list("user_id", "group_id")),
        "auth_groups": list(Group.objects.order_by("pk").values_list("name", flat=True)),
        "tokens": list(ApiToken.objects.order_by("pk").values_list("pk", "revoked_at")),
        "subscriptions": list(Subscription.objects.order_by("pk").values_list("pk", "owner_id", "target")),
        "inbox_marks": list(InboxMark.objects.order_by("pk").values_list("user_id", "seen_event_id")),
        "unlocks": AuditEvent.objects.filter(action="auth.unlock", outcome=AuditEvent.SUCCESS).count(),
    }


# ----------------------------------------------------------------------------- the cells


def expected_status(route, method, persona, obj):
    allowed = route.get if method == "GET" else route.post
    ok = route.get_ok if method == "GET" else route.post_ok
    if route.public:
        return ok if allowed is not None else 405
    if persona == "anon":
        return 302
    if allowed is None:
        return 405
    if (obj, method, persona) in route.overrides:
        return route.overrides[(obj, method, persona)]
    if route.perm_first and persona not in allowed:
        return 403
    if obj is not None and persona not in SCOPE[obj]:
        return 404
    if persona not in allowed:
        return 403
    return ok


def cells():
    for route in ROUTES:
        # GET always (a POST-only view answers 405); POST where the route takes one.
        methods = ["GET"] + (["POST"] if route.post is not None else [])
        for method in methods:
            objects = route.objects
            if method == "POST" and route.post_objects is not None:
                objects = route.post_objects
            for obj in objects:
                for persona in PERSONAS:
                    yield pytest.param(
                        route, obj, method, persona, id=f"{route.name}|{obj}|{method}|{persona}"
                    )


def url_for(route, world, obj):
    if obj is None or route.param:
        return reverse(route.name)
    return reverse(route.name, kwargs={route.kwarg: world.objects[obj].pk})


def leaked_names(persona, body):
    return [
        NAMES[key] for key, seen_by in NAME_SCOPE.items() if persona not in seen_by and NAMES[key] in body
    ]


@pytest.mark.parametrize(("route", "obj", "method", "persona"), list(cells()))
def test_it_enforces_the_scope_rule(route, obj, method, persona, world, client):
    user = world.people[persona]
    if user is not None:
        client.force_login(user)
    url = url_for(route, world, obj)
    expected = expected_status(route, method, persona, obj)
    before_state = db_state()
    last_event = AuditEvent.objects.order_by("-id").values_list("id", flat=True).first()
    target = world.objects[obj] if obj is not None else None
    if method == "GET":
        query = dict(route.query(world, target)) if route.query else {}
        if route.param and obj is not None:
            query[route.param] = target.pk
        response = client.get(url, query)
    else:
        data = dict(route.data(world, target)) if route.data else {}
        if route.param and obj is not None:
            data[route.param] = target.pk
        response = client.post(url, data)
    status = response.status_code
    assert status == expected, f"{method} {url} as {persona}: {status}, expected {expected}"
    if status == 302 and persona == "anon" and not route.public:
        assert response.url.startswith(reverse("login")), response.url
    if status == 200 and not getattr(response, "streaming", False):
        body = response.content.decode()
        leaks = leaked_names(persona, body)
        assert not leaks, f"{url} shows {leaks} to {persona}"
        # The leak check means something only if the page does list what it may.
        missing = [NAMES[key] for key in route.lists if persona in NAME_SCOPE[key] and NAMES[key] not in body]
        assert not missing, f"{url} does not show {missing} to {persona}"
    new_events = AuditEvent.objects.filter(id__gt=last_event or 0)
    if method != "POST" or route.public:
        return
    if status == route.post_ok and persona != "anon":
        event = new_events.filter(action=route.action).first()
        assert event is not None, f"no {route.action} event after {url} as {persona}"
        assert event.actor == user and event.outcome == AuditEvent.SUCCESS, (event.actor, event.outcome)
        assert db_state() != before_state, f"{url} as {persona} changed nothing"
    else:
        assert db_state() == before_state, f"refused {url} as {persona} changed the database"
        assert not new_events.filter(outcome=AuditEvent.SUCCESS).exists()
        if (obj, method, persona) in route.overrides:
            # Refused by a rule past the scope check (policy, state): audited as such.
            refusal = new_events.filter(action=route.action).first()
            assert refusal is not None and refusal.actor == user, f"refusal of {url} not audited"


# ----------------------------------------------------------------------------- the REST API

# Every /api/v1/ route x persona, with each persona's own API token (Authorization: Bearer).
# The same rule as the pages, in the API's words: anonymous -> 401 (a Bearer challenge, not
# a redirect to the sign-in page); out of scope -> 404; in scope without the right -> 403.


@dataclass(frozen=True)
class ApiRoute:
    name: str
    method: str = "GET"
    objects: tuple = (None,)
    allowed: frozenset = frozenset()
    ok: int = 200
    data: object = None  # (world, object or None) -> JSON body
    action: str = ""  # audit action of an allowed request ("" = read-only: nothing written)
    param: str = ""  # the object goes in this body field instead of the URL
    perm_first: bool = False
    public: bool = False
    overrides: dict = field(default_factory=dict)  # (obj, persona) -> status
    lists: tuple = ()
    notes: str = ""


def _api_plan(w, vm):
    target = w.p1 if vm is not None and vm.host_id == w.d1.pk else w.d1
    return {"target": target.pk, "mode": "live", "options": {"bandwidth": 50}}


API_ROUTES = [
    ApiRoute("api:index", allowed=SIGNED_IN),
    ApiRoute(
        "api:schema", allowed=frozenset(PERSONAS), public=True, notes="describes the API, shows no data"
    ),
    ApiRoute("api:docs", allowed=frozenset(PERSONAS), public=True),
    ApiRoute("api:host_list", allowed=SIGNED_IN, lists=("host_s1",)),
    ApiRoute(
        "api:host_list",
        "POST",
        allowed=ADMIN,
        ok=201,
        data=lambda w, obj: {"name": "new-host", "uri": w.node_uri},
        action="host.register",
    ),
    ApiRoute("api:host_detail", objects=("host_p1", "host_s1"), allowed=SIGNED_IN),
    ApiRoute(
        "api:host_detail",
        "PATCH",
        objects=("host_p1", "host_s1"),
        allowed=ADMIN,
        data=lambda w, obj: {"description": "edited"},
        action="host.change",
    ),
    ApiRoute(
        "api:host_detail",
        "DELETE",
        objects=("host_p1", "host_s1"),
        allowed=ADMIN,
        ok=204,
        action="host.remove",
    ),
    ApiRoute(
        "api:host_sync", "POST", objects=("host_p1", "host_s1"), allowed=MIGRATORS, action="inventory.sync"
    ),
    ApiRoute("api:vm_list", allowed=SIGNED_IN, lists=("vm_alice", "vm_bob", "vm_team", "vm_hidden")),
    ApiRoute("api:vm_detail", objects=("vm_alice", "vm_hidden"), allowed=SIGNED_IN),
    ApiRoute(
        "api:host_maintenance",
        "POST",
        objects=("host_p1", "host_s1"),
        allowed=MIGRATORS,  # hosts.maintain_host
        data=lambda w, host: {"on": True, "reason": "kernel update"},
        action="host.maintenance",
    ),
    ApiRoute(
        "api:host_evacuate",
        "POST",
        objects=("host_p1", "host_s1"),
        allowed=MIGRATORS,
        data=lambda w, host: {"dry_run": True},
        notes="the dry run plans and changes nothing; starting a batch: tests/api/test_api.py",
    ),
    ApiRoute("api:batch_list", allowed=SIGNED_IN),  # an empty list for those who see no batch
    ApiRoute("api:batch_detail", objects=("batch_run", "batch_done"), allowed=STAFF),
    ApiRoute(
        "api:batch_pause", "POST", objects=("batch_run",), allowed=MIGRATORS, ok=202, action="batch.pause"
    ),
    ApiRoute(
        "api:batch_resume",
        "POST",
        objects=("batch_paused",),
        allowed=MIGRATORS,
        ok=202,
        action="batch.resume",
    ),
    ApiRoute(
        "api:batch_cancel", "POST", objects=("batch_run",), allowed=MIGRATORS, ok=202, action="batch.cancel"
    ),
    ApiRoute(
        "api:vm_power",
        "POST",
        objects=("vm_alice", "vm_hidden"),
        allowed=REQUESTERS,  # hosts.power_vm, as on the VM page (libvirt faked in the world)
        data=lambda w, vm: {"action": "destroy"},
        action="vm.power",
    ),
    ApiRoute(
        "api:preflight",
        "POST",
        objects=("vm_bob", "vm_hidden"),
        param="vm",
        allowed=REQUESTERS,
        data=_api_plan,
        notes="dry run: read-only, like the dry-run page (scope first, then the right)",
    ),
    ApiRoute("api:job_list", allowed=SIGNED_IN, lists=("vm_alice", "vm_hidden", "vm_hidden_run")),
    ApiRoute(
        "api:job_list",
        "POST",
        objects=("vm_bob", "vm_team"),
        param="vm",
        allowed=REQUESTERS,
        ok=202,
        data=_api_plan,
        action="migration.request",
        perm_first=True,
        overrides={("vm_team", "alice"): 400},
        notes="as the wizard: the right to migrate first; alice's team VM: refused by policy",
    ),
    ApiRoute("api:job_detail", objects=("job_alice", "job_hidden"), allowed=SIGNED_IN),
    ApiRoute("api:job_events", objects=("job_alice", "job_hidden", "job_alice_past"), allowed=SIGNED_IN),
    ApiRoute(
        "api:job_cancel",
        "POST",
        objects=("job_alice", "job_hidden"),
        allowed=CANCELLERS,
        ok=202,
        action="migration.cancel",
    ),
    ApiRoute(
        "api:job_bandwidth",
        "POST",
        objects=("job_alice_run", "job_hidden_run"),
        allowed=MIGRATORS,
        ok=202,
        data=lambda w, job: {"bandwidth": 20},
        action="migration.bandwidth",
    ),
    ApiRoute(
        "api:job_downtime",
        "POST",
        objects=("job_alice_run", "job_hidden_run"),
        allowed=MIGRATORS,
        ok=202,
        data=lambda w, job: {"downtime": 500},
        action="migration.downtime",
    ),
    ApiRoute(
        "api:job_postcopy",
        "POST",
        objects=("job_alice_run", "job_hidden_run"),
        allowed=MIGRATORS,
        ok=202,
        action="migration.postcopy",
    ),
    ApiRoute("api:approval_list", allowed=MIGRATORS, lists=("vm_alice", "vm_hidden")),
    ApiRoute(
        "api:approve",
        "POST",
        objects=("job_alice", "job_hidden"),
        allowed=MIGRATORS,
        ok=202,
        action="migration.approve",
    ),
    ApiRoute(
        "api:reject",
        "POST",
        objects=("job_alice", "job_hidden"),
        allowed=MIGRATORS,
        ok=202,
        data=lambda w, job: {"reason": "not now"},
        action="migration.reject",
    ),
    ApiRoute("api:audit_list", allowed=STAFF, lists=("vm_alice", "vm_hidden")),
    ApiRoute("api:audit_detail", objects=("event_alice", "event_admin"), allowed=STAFF),
]


def api_expected_status(route, persona, obj):
    if route.public:
        return route.ok
    if persona == "anon":
        return 401
    if (obj, persona) in route.overrides:
        return route.overrides[(obj, persona)]
    if route.perm_first and persona not in route.allowed:
        return 403
    if obj is not None and persona not in SCOPE[obj]:
        return 404
    if persona not in route.allowed:
        return 403
    return route.ok


def api_cells():
    for route in API_ROUTES:
        for obj in route.objects:
            for persona in PERSONAS:
                yield pytest.param(route, obj, persona, id=f"{route.name}|{route.method}|{obj}|{persona}")


@pytest.mark.parametrize(("route", "obj", "persona"), list(api_cells()))
def test_it_enforces_the_scope_rule_on_the_api(route, obj, persona, world):
    from django.test import Client

    from api.services import do_create_token

    user = world.people[persona]
    headers = {}
    if user is not None:
        headers["HTTP_AUTHORIZATION"] = f"Bearer {do_create_token(user, 'matrix', actor=user)[1]}"
    client = Client(**headers)
    target = world.objects[obj] if obj is not None else None
    if obj is None or route.param:
        url = reverse(route.name)
    else:
        url = reverse(route.name, kwargs={"pk": target.pk})
    body = dict(route.data(world, target)) if route.data else {}
    if route.param and obj is not None:
        body[route.param] = target.pk
    before_state = db_state()
    last_event = AuditEvent.objects.order_by("-id").values_list("id", flat=True).first() or 0
    if route.method == "GET":
        response = client.get(url)
    else:
        response = getattr(client, route.method.lower())(url, body, content_type="application/json")
    expected = api_expected_status(route, persona, obj)
    status = response.status_code
    assert status == expected, f"{route.method} {url} as {persona}: {status}, expected {expected}"
    if status == 401:
        assert response["WWW-Authenticate"].startswith("Bearer")
    text = response.content.decode()
    assert not leaked_names(persona, text), f"{url} shows {leaked_names(persona, text)} to {persona}"
    if status == 200 and route.method == "GET":
        missing = [NAMES[k] for k in route.lists if persona in NAME_SCOPE[k] and NAMES[k] not in text]
        assert not missing, f"{url} does not show {missing} to {persona}"
    new_events = AuditEvent.objects.filter(id__gt=last_event)
    if route.method == "GET" or route.public:
        assert not new_events.exclude(action="api.token.refused").exists()
        return
    if status == route.ok and route.action:
        event = new_events.filter(action=route.action).first()
        assert event is not None, f"no {route.action} event after {url} as {persona}"
        assert event.actor == user and event.outcome == AuditEvent.SUCCESS, (event.actor, event.outcome)
        assert db_state() != before_state, f"{url} as {persona} changed nothing"
    else:
        assert db_state() == before_state, f"{route.method} {url} as {persona} changed the database"
        assert not new_events.filter(outcome=AuditEvent.SUCCESS).exists()
        if (obj, persona) in route.overrides:
            refusal = new_events.filter(action=route.action).first()
            assert refusal is not None and refusal.actor == user, f"refusal of {url} not audited"


def test_it_covers_every_api_route_and_method():
    """Every API URL name in the matrix, and every method its view answers."""
    from django.urls import resolve

    names = [n for n in all_url_names() if n.startswith("api:")]
    tested = {(r.name, r.method) for r in API_ROUTES}
    assert not [n for n in names if not any(r.name == n for r in API_ROUTES)]
    for name in names:
        try:
            url = reverse(name)
        except Exception:
            url = reverse(name, kwargs={"pk": 1})
        view = resolve(url).func.view_class
        methods = {m.upper() for m in ("get", "post", "patch", "put", "delete") if hasattr(view, m)}
        assert methods <= {m for n, m in tested if n == name}, (name, methods)


# Django's admin is not installed: every change goes through kvmweb's own pages and
# services (audited, rate-limited sign-in, last-administrator guard). Nothing answers
# under /admin/, for anybody, signed in or not, superuser or not.
ADMIN_PATHS = ("/admin/", "/admin/login/", "/admin/auth/user/", "/admin/hosts/host/1/delete/")


@pytest.mark.parametrize("persona", PERSONAS + ("superuser",))
def test_it_has_no_django_admin(persona, world, client):
    if persona == "superuser":
        user = User.objects.create_superuser("root", password="a long enough passphrase 42")
    else:
        user = world.people[persona]
    if user is not None:
        client.force_login(user)
    for path in ADMIN_PATHS:
        assert client.get(path).status_code == 404, path
        assert client.post(path, {"username": "admin", "password": "x"}).status_code == 404, path
    assert not any(name.startswith("admin:") for name in all_url_names())


# ----------------------------------------------------------------------------- coverage


def _walk(patterns, namespace=""):
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            inner = pattern.namespace if pattern.namespace else ""
            ns = ":".join(filter(None, [namespace, inner]))
            yield from _walk(pattern.url_patterns, ns)
        elif isinstance(pattern, URLPattern):
            name = pattern.name or f"<unnamed {pattern.pattern}>"
            yield f"{namespace}:{name}" if namespace else name


def all_url_names():
    return sorted(set(_walk(get_resolver().url_patterns)))


def test_it_covers_every_url():
    covered = {route.name for route in ROUTES} | {route.name for route in API_ROUTES} | set(EXEMPT)
    missing = [
        name
        for name in all_url_names()
        if name not in covered and not any(name.startswith(p) for p in EXEMPT_PREFIXES)
    ]
    assert not missing, f"URLs missing from the permission matrix: {missing}"


def test_it_lists_only_urls_that_exist():
    names = set(all_url_names())
    assert not [route.name for route in ROUTES + API_ROUTES if route.name not in names]


def test_it_has_a_distinct_scope_for_every_object():
    # Guard against a world where "out of scope" cells would silently test nothing.
    assert {"alice", "bob"} & SCOPE["vm_alice"] == {"alice"}
    for key in SCOPE:
        assert "mallory" not in SCOPE[key] and "anon" not in SCOPE[key]


# ----------------------------------------------------------------------------- commands

# Commands that act for a kvmweb user (--user) apply the same scope rule: out of scope is
# "not visible" (the same words as for an id that does not exist), in scope without the
# right is "may not". Their CommandError is the command line's 404/403.
NOT_FOUND, FORBIDDEN, OK, REFUSED = "not found", "forbidden", "ok", "refused"


@dataclass(frozen=True)
class CommandCell:
    name: str
    obj: str
    args: object  # world, object -> argv after the command name
    allowed: frozenset
    action: str
    refused: frozenset = frozenset()  # in scope and allowed, refused by policy (audited)


COMMAND_CELLS = [
    CommandCell("migration_job", "job_alice", lambda w, j: [str(j.pk), "show"], SIGNED_IN, ""),
    CommandCell("migration_job", "job_hidden", lambda w, j: [str(j.pk), "show"], SIGNED_IN, ""),
    CommandCell(
        "migration_job", "job_alice", lambda w, j: [str(j.pk), "cancel"], CANCELLERS, "migration.cancel"
    ),
    CommandCell(
        "migration_job", "job_hidden", lambda w, j: [str(j.pk), "cancel"], CANCELLERS, "migration.cancel"
    ),
    CommandCell(
        "migration_job",
        "job_alice_run",
        lambda w, j: [str(j.pk), "bandwidth", "20"],
        MIGRATORS,
        "migration.bandwidth",
    ),
    CommandCell(
        "migrate_vm",
        "vm_bob",
        lambda w, vm: [vm.name, w.d1.name, "--mode", "live", "--bandwidth", "50"],
        REQUESTERS,
        "migration.request",
    ),
    CommandCell(
        "migrate_vm",
        "vm_team",
        lambda w, vm: [vm.name, w.p1.name, "--mode", "live", "--bandwidth", "50"],
        REQUESTERS,
        "migration.request",
        refused=frozenset({"alice"}),
    ),
    CommandCell("maintenance", "host_p1", lambda w, h: [h.name, "on"], MIGRATORS, "host.maintenance"),
    CommandCell("maintenance", "host_s1", lambda w, h: [h.name, "on"], MIGRATORS, "host.maintenance"),
    CommandCell("batch", "batch_run", lambda w, b: [str(b.pk), "pause"], MIGRATORS, "batch.pause"),
    CommandCell("vm_tags", "vm_bob", lambda w, vm: [vm.name, "--add", "db"], MIGRATORS, "vm.tags"),
    CommandCell("vm_tags", "vm_hidden", lambda w, vm: [vm.name, "--add", "db"], MIGRATORS, "vm.tags"),
    CommandCell(
        "blackout",
        "group_prod",
        lambda w, g: [g.name, "2030-01-01T00:00", "2030-01-01T02:00"],
        ADMIN,
        "blackout.create",
    ),
]
# Project commands that act for nobody in particular: whoever runs them has a shell on the
# server (and the database), which is more than any role.
MACHINE_COMMANDS = {
    "add_host": "registers a host (server shell = administrator)",
    "sync_inventory": "inventory sync, same as the scheduled task",
    "ensure_admin": "creates the first administrator when no user exists",
    "ensure_schedules": "creates periodic tasks",
    "lab_demo": "starts the lab (root)",
    "preflight": "read-only checklist from the server shell",
    "reconcile_jobs": "the reconciler loop",
    "verify_audit": "read-only chain check (tests/audit/test_verify_audit.py)",
    "api_token": "creates or revokes a token of the named user (tests/api/test_api.py)",
    "notify": "the notification dispatcher, same as the scheduled task",
    "cli_server": "runs migrate_vm/preflight for callers of its own user (migrations_app/cliserver.py)",
}


def command_expectation(cell, persona):
    if persona not in SCOPE[cell.obj]:
        return NOT_FOUND
    if persona not in cell.allowed:
        return FORBIDDEN
    if persona in cell.refused:
        return REFUSED
    return OK


def command_cells():
    for cell in COMMAND_CELLS:
        for persona in sorted(SIGNED_IN):
            yield pytest.param(cell, persona, id=f"{cell.name}|{cell.obj}|{cell.action or 'show'}|{persona}")


@pytest.mark.parametrize(("cell", "persona"), list(command_cells()))
def test_it_applies_the_scope_rule_to_commands(cell, persona, world, capsys):
    from django.core.management import call_command
    from django.core.management.base import CommandError

    user = world.people[persona]
    obj = world.objects[cell.obj]
    argv = cell.args(world, obj) + ["--user", user.get_username()]
    expected = command_expectation(cell, persona)
    before_state = db_state()
    last_event = AuditEvent.objects.order_by("-id").values_list("id", flat=True).first() or 0
    try:
        call_command(cell.name, *argv)
        error = None
    except CommandError as exc:
        error = str(exc)
    out = capsys.readouterr().out
    new_events = AuditEvent.objects.filter(id__gt=last_event)
    if expected == OK:
        assert error is None, f"{cell.name} {argv}: {error}"
        if cell.action:
            event = new_events.get(action=cell.action)
            assert event.actor == user and event.outcome == AuditEvent.SUCCESS
            assert db_state() != before_state
        else:
            assert obj.vm_name in out
        return
    assert error is not None, f"{cell.name} {argv} as {persona} was not refused: {out}"
    if expected == NOT_FOUND:
        assert "visible" in error, error
    if expected in (NOT_FOUND, FORBIDDEN):
        # Names outside the persona's scope never appear in the refusal (except what the
        # persona typed: a refusal may echo the argument it could not find).
        leaks = [name for name in leaked_names(persona, error + out) if name not in argv]
        assert not leaks, error
    assert db_state() == before_state
    assert not new_events.filter(outcome=AuditEvent.SUCCESS).exists()
    if expected == REFUSED:
        assert new_events.filter(action=cell.action, actor=user).exclude(outcome=AuditEvent.SUCCESS).exists()


def test_it_covers_every_project_command():
    from django.core.management import get_commands

    ours = {
        name
        for name, app in get_commands().items()
        if app.startswith(("hosts", "migrations_app", "kvmweb", "api", "notifications"))
    }
    covered = {cell.name for cell in COMMAND_CELLS} | set(MACHINE_COMMANDS)
    assert not sorted(ours - covered), f"commands missing from the matrix: {sorted(ours - covered)}"


# ----------------------------------------------------------------------------- WebSockets

WS_OBJECTS = (
    "job_alice",
    "job_hidden",
    "job_alice_run",
    "job_hidden_run",
    "job_alice_past",
    "job_missing",
    "list",
    "batch_run",  # ws/batches/<id>/ (fleet/consumers.py): the batch page's live rows
    "batch_missing",
    "bell",  # ws/notifications/ (notifications/consumers.py): the header's bell, live
)
WS_TIMEOUT = 3


def ws_cells():
    for obj in WS_OBJECTS:
        for persona in PERSONAS:
            yield pytest.param(obj, persona, id=f"ws|{obj}|{persona}")


def _ws_session(user):
    from django.test import Client

    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("obj", "persona"), list(ws_cells()))
async def test_it_enforces_the_scope_rule_on_websockets(obj, persona, world, transactional_db, monkeypatch):
    """ws/jobs/<id>/, ws/jobs/, ws/batches/<id>/ and ws/notifications/: anonymous -> closed 4401; a job
    outside the persona's scope or one that does not exist -> closed 4404 with nothing sent, and later
    progress of that job reaches nobody who guessed its id; in scope -> the snapshot first. The bell:
    the persona's own bell first; a hidden job's end and the secret host going away reach the staff
    only."""
    from channels.db import database_sync_to_async
    from channels.testing import WebsocketCommunicator
    from django.db import OperationalError, connections
    from django.db.models import F

    from kvmweb.asgi import application
    from migrations_app import streaming
    from notifications import live

    monkeypatch.setattr(streaming, "POLL_INTERVAL", 0.05)
    monkeypatch.setattr(live, "MIN_INTERVAL", 0.05)
    user = world.people[persona]
    if obj == "bell":
        path, job = "/ws/notifications/", None
    elif obj == "list":
        path, job = "/ws/jobs/", None
    elif obj == "job_missing":
        path, job = "/ws/jobs/987654/", None
    elif obj == "batch_missing":
        path, job = "/ws/batches/987654/", None
    elif obj.startswith("batch"):
        path, job = f"/ws/batches/{world.objects[obj].pk}/", None
    else:
        job = world.objects[obj]
        path = f"/ws/jobs/{job.pk}/"
    headers = [(b"host", b"127.0.0.1"), (b"origin", b"http://127.0.0.1")]
    if user is not None:
        cookie = await database_sync_to_async(_ws_session)(user)
        headers.append((b"cookie", f"sessionid={cookie}".encode()))

    @database_sync_to_async
    def progress(target, **fields):
        # The test database is in-memory SQLite with a shared cache, where a reader (the
        # hub's poller) makes a writer fail at once with "table is locked" instead of
        # waiting: retry like a busy timeout would.
        for attempt in range(50):
            try:
                MigrationJob.objects.filter(pk=target.pk).update(progress_seq=F("progress_seq") + 1, **fields)
                break
            except OperationalError:
                if attempt == 49:
                    raise
                time.sleep(0.02)
        streaming.publish_job(target.pk)

    @database_sync_to_async
    def bell_news():
        """The hidden job fails and the secret host goes away (their audit events)."""
        for attempt in range(50):
            try:
                with transaction.atomic():
                    record("migration.finish", target=world.job_hidden_run, details={"status": "failed"})
                    record("host.status", target=world.s1, details={"from": "reachable", "to": "unreachable"})
                break
            except OperationalError:
                if attempt == 49:
                    raise
                time.sleep(0.02)

    comm = WebsocketCommunicator(application, path, headers=headers)
    try:
        connected, _ = await comm.connect(timeout=WS_TIMEOUT)
        assert connected  # accepted, then closed with a code the browser can read
        if user is None:
            assert await comm.receive_output(timeout=WS_TIMEOUT) == {"type": "websocket.close", "code": 4401}
            return
        if obj == "list":
            if persona in STAFF | {"alice"}:  # those who can see at least one job
                first = await comm.receive_from(timeout=WS_TIMEOUT)
                assert not leaked_names(persona, first), f"{path} snapshot shows {persona} out-of-scope jobs"
            # A hidden job changes: self-service users and outsiders hear nothing of it.
            await progress(world.job_hidden_run, percent=50.0, status=MigrationJob.SUCCEEDED)
            if persona not in STAFF:
                # Drain what arrived, without a receive timeout (that would end the app).
                await asyncio.sleep(0.5)
                while not comm.output_queue.empty():
                    text = comm.output_queue.get_nowait().get("text", "")
                    assert not leaked_names(persona, text), f"{persona} heard {leaked_names(persona, text)}"
            return
        if obj == "bell":
            first = await comm.receive_from(timeout=WS_TIMEOUT)
            assert 'id="bell"' in first and not leaked_names(persona, first)
            await bell_news()
            if persona in STAFF:  # they see s1: the news arrives live
                deadline = asyncio.get_running_loop().time() + 10 * WS_TIMEOUT
                while "s1-secret" not in (text := await comm.receive_from(timeout=10 * WS_TIMEOUT)):
                    assert asyncio.get_running_loop().time() < deadline
            else:
                await asyncio.sleep(1.0)
                while not comm.output_queue.empty():
                    text = comm.output_queue.get_nowait().get("text", "")
                    assert not leaked_names(persona, text), f"{persona} heard {leaked_names(persona, text)}"
            return
        if obj == "batch_run" and persona in SCOPE[obj]:
            first = await comm.receive_from(timeout=WS_TIMEOUT)
            assert f'id="batch-live-{world.objects[obj].pk}"' in first
            return
        if job is not None and persona in SCOPE[obj]:
            first = await comm.receive_from(timeout=WS_TIMEOUT)
            assert f'id="job-progress-{job.pk}"' in first
            assert not leaked_names(persona, first)
            return
        assert await comm.receive_output(timeout=WS_TIMEOUT) == {"type": "websocket.close", "code": 4404}
        if job is not None:
            await progress(job, percent=66.0)
            assert await comm.receive_nothing(timeout=0.4)
        assert streaming.get_hub().watcher_count == 0
    finally:
        if not comm.future.done():
            await comm.disconnect()
        # Let the hub's poller stop (its last query must not race the table flush).
        hub = streaming.get_hub()
        for _ in range(150):
            if not hub.is_polling:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)  # the poller's own connection-closing task
        await database_sync_to_async(connections.close_all)()
