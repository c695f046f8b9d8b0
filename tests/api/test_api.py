"""The REST API: tokens, the scope rule, jobs with Idempotency-Key, rate limit, schema."""

from datetime import timedelta

import pytest
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

from api.models import ApiToken
from kvmweb.audit.models import AuditEvent
from migrations_app.models import MigrationJob
from tests.accounts.world import build

pytestmark = pytest.mark.django_db


@pytest.fixture
def world(alice, bob):
    return build(alice, bob)


def test_it_creates_a_token_with_the_command_and_authenticates_with_it(operator, world, capsys):
    call_command("api_token", "operator", "--expires", "7")
    text = capsys.readouterr().out.strip()
    token = ApiToken.objects.get(user=operator)
    assert text.startswith(f"kvmweb_{token.prefix}_") and token.digest not in text
    assert text not in str(list(ApiToken.objects.values()))  # only the digest is stored
    assert timedelta(days=6, hours=23) < token.expires_at - timezone.now() <= timedelta(days=7)
    event = AuditEvent.objects.get(action="api.token.create")
    assert event.actor == operator and event.details["prefix"] == token.prefix
    response = Client(HTTP_AUTHORIZATION=f"Bearer {text}").get("/api/v1/hosts/")
    assert response.status_code == 200
    assert {h["name"] for h in response.json()["results"]} == {"p1-prod-host", "d1-dev-host", "s1-secret"}
    token.refresh_from_db()
    assert token.last_used_at is not None and token.last_used_ip == "127.0.0.1"


@pytest.mark.parametrize("case", ["garbage", "unknown", "wrong", "revoked", "expired", "inactive"])
def test_it_refuses_bad_tokens_with_401_and_audits_each(case, operator, token_for):
    text = token_for(operator)
    token = ApiToken.objects.get(user=operator)
    if case == "garbage":
        text = "nonsense"
    elif case == "unknown":
        text = "kvmweb_deadbeef_" + "x" * 43
    elif case == "wrong":
        text = text[:-4] + "AAAA"
    elif case == "revoked":
        ApiToken.objects.filter(pk=token.pk).update(revoked_at=timezone.now())
    elif case == "expired":
        ApiToken.objects.filter(pk=token.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    else:
        operator.is_active = False
        operator.save()
    response = Client(HTTP_AUTHORIZATION=f"Bearer {text}").get("/api/v1/vms/")
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    event = AuditEvent.objects.filter(action="api.token.refused").get()
    assert event.outcome == AuditEvent.DENIED and event.ip == "127.0.0.1"
    if case in ("wrong", "revoked", "expired", "inactive"):
        assert event.actor_id == operator.pk and event.details["prefix"] == token.prefix, (
            event.actor_id,
            operator.pk,
            event.details,
        )


def test_it_never_lets_a_token_open_an_html_page(operator, token_for):
    client = Client(HTTP_AUTHORIZATION=f"Bearer {token_for(operator)}")
    response = client.get("/hosts/")
    assert response.status_code == 302 and response.url.startswith("/login/")
    assert client.get("/account/tokens/").status_code == 302


def test_it_keeps_csrf_for_session_auth(operator, world, clean_preflight):
    client = Client(enforce_csrf_checks=True)
    client.force_login(operator)
    assert client.get("/api/v1/jobs/").status_code == 200  # reads need no token
    body = {"vm": world.alice_web.pk, "target": world.d1.pk, "mode": "live"}
    response = client.post("/api/v1/jobs/", body, content_type="application/json")
    assert response.status_code == 403 and "CSRF" in response.json()["detail"]
    assert not MigrationJob.objects.exists()
    csrf = client.get("/account/tokens/").cookies["csrftoken"].value
    response = client.post("/api/v1/jobs/", body, content_type="application/json", HTTP_X_CSRFTOKEN=csrf)
    assert response.status_code == 202


def test_it_creates_one_job_for_a_retried_request_with_the_same_idempotency_key(
    operator, world, api, clean_preflight
):
    client = api(operator)
    body = {"vm": world.bob_db.pk, "target": world.d1.pk, "mode": "live", "options": {"bandwidth": 40}}
    first = client.post("/api/v1/jobs/", body, content_type="application/json", HTTP_IDEMPOTENCY_KEY="k-1")
    assert first.status_code == 202
    job = MigrationJob.objects.get()
    assert first["Location"] == f"/api/v1/jobs/{job.pk}/" == first.json()["url"]
    assert job.requested_by == operator and job.options["bandwidth"] == 40
    again = client.post("/api/v1/jobs/", body, content_type="application/json", HTTP_IDEMPOTENCY_KEY="k-1")
    assert again.status_code == 202 and again["Idempotent-Replayed"] == "true"
    assert again.json() == first.json() and again["Location"] == first["Location"]
    assert MigrationJob.objects.count() == 1
    assert AuditEvent.objects.filter(action="migration.request", outcome="success").count() == 1
    other = dict(body, target=world.p1.pk)
    reused = client.post("/api/v1/jobs/", other, content_type="application/json", HTTP_IDEMPOTENCY_KEY="k-1")
    assert reused.status_code == 422
    # Without a key the retry is judged again: the VM already has an active job.
    conflict = client.post("/api/v1/jobs/", body, content_type="application/json")
    assert conflict.status_code == 409 and conflict.json()["job"] == f"/api/v1/jobs/{job.pk}/"
    # The same key from another user is another request.
    admin_client = api(world.__dict__.get("admin") or _admin())
    assert (
        admin_client.post(
            "/api/v1/jobs/", body, content_type="application/json", HTTP_IDEMPOTENCY_KEY="k-1"
        ).status_code
        == 409
    )


def _admin():
    from django.contrib.auth.models import Group, User

    user = User.objects.create_user("admin2", password="x")
    user.groups.add(Group.objects.get(name="Administrator"))
    return user


def test_it_cancels_and_lists_events_through_the_api(operator, world, api, clean_preflight):
    client = api(operator)
    body = {"vm": world.bob_db.pk, "target": world.d1.pk, "mode": "live"}
    job_url = client.post("/api/v1/jobs/", body, content_type="application/json")["Location"]
    cancel = client.post(job_url + "cancel/")
    assert cancel.status_code == 202 and cancel.json()["status"] == "cancelled"
    assert AuditEvent.objects.filter(action="migration.cancel", actor=operator, outcome="success").exists()
    again = client.post(job_url + "cancel/")
    assert again.status_code == 409
    assert AuditEvent.objects.filter(action="migration.cancel", outcome="failure").exists()
    events = client.get(job_url + "events/").json()
    assert [e["level"] for e in events] == ["info", "warn"]
    later = client.get(job_url + "events/", {"after": events[0]["id"]}).json()
    assert [e["id"] for e in later] == [events[1]["id"]]


def test_it_lets_an_operator_approve_a_self_service_request(alice, operator, world, api, clean_preflight):
    body = {"vm": world.alice_web.pk, "target": world.d1.pk, "mode": "live", "options": {"bandwidth": 50}}
    created = api(alice).post("/api/v1/jobs/", body, content_type="application/json")
    assert created.status_code == 202 and created.json()["status"] == "pending_approval"
    ops = api(operator)
    waiting = ops.get("/api/v1/approvals/").json()["results"]
    assert [j["id"] for j in waiting] == [created.json()["id"]]
    approved = ops.post(f"/api/v1/approvals/{created.json()['id']}/approve/")
    assert approved.status_code == 202 and approved.json()["status"] == "queued"
    assert AuditEvent.objects.get(action="migration.approve").actor == operator


def test_it_filters_and_paginates_the_audit_history(auditor, operator, api, token_for):
    for _ in range(3):
        token_for(operator)
    client = api(auditor)
    page = client.get(
        "/api/v1/audit/", {"action": "api.token.create", "who": "operator", "page_size": 2}
    ).json()
    assert page["count"] == 3 and len(page["results"]) == 2 and page["next"]
    assert {e["actor_name"] for e in page["results"]} == {"operator"}
    assert client.get("/api/v1/audit/", {"since": "not a date"}).status_code == 400


def test_it_rate_limits_each_token(operator, api, settings):
    settings.KVMWEB_API_RATE = "3/min"
    first, second = api(operator), api(operator)
    codes = [first.get("/api/v1/vms/").status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    assert second.get("/api/v1/vms/").status_code == 200  # another token, its own budget


def test_it_serves_the_openapi_schema_and_local_docs(client):
    schema = client.get("/api/v1/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert schema.status_code == 200
    doc = schema.json()
    assert doc["openapi"].startswith("3.")
    assert {"/api/v1/jobs/", "/api/v1/preflight/", "/api/v1/audit/", "/api/v1/hosts/{id}/sync/"} <= set(
        doc["paths"]
    )
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    for page in ("/api/v1/docs/",):
        html = client.get(page).content.decode()
        assert "/static/drf_spectacular_sidecar/" in html
        assert "cdn" not in html.lower() and "https://" not in html


def test_it_gives_the_same_report_as_the_preflight_command(operator, api, node_xml, capsys):
    import json
    import uuid

    from hosts.models import VM, Host

    src = Host.objects.create(name="src", uri=f"test://{node_xml('src')}")
    dst = Host.objects.create(name="dst", uri=f"test://{node_xml('dst')}")
    vm = VM.objects.create(uuid=uuid.uuid4(), name="vm-x", host=src, state=VM.RUNNING)
    response = api(operator).post(
        "/api/v1/preflight/",
        {"vm": vm.pk, "target": dst.pk, "mode": "live", "quick": True},
        content_type="application/json",
    )
    assert response.status_code == 200
    with pytest.raises(SystemExit):
        call_command("preflight", "vm-x", "dst", "--mode", "live", "--json", "--quick")
    expected = json.loads(capsys.readouterr().out)
    got = response.json()
    assert set(got) == set(expected)
    assert got["verdict"] == expected["verdict"]
    assert [(r["id"], r["status"]) for r in got["results"]] == [
        (r["id"], r["status"]) for r in expected["results"]
    ]
    assert not MigrationJob.objects.exists()


def test_it_generates_a_valid_schema_without_warnings(tmp_path):
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "schema.yaml"))
    assert "/api/v1/approvals/{id}/approve/" in (tmp_path / "schema.yaml").read_text()


def test_it_stops_auditing_a_flood_of_bad_tokens(operator, token_for, settings):
    """Each bad token is an audit event, up to the limit per address; then the address is
    refused outright (429) and the audit chain is not flooded. Other addresses are not hurt."""
    settings.KVMWEB_API_AUTH_FAILURES = 3
    bad = Client(HTTP_AUTHORIZATION="Bearer kvmweb_00000000_nope", REMOTE_ADDR="198.51.100.7")
    codes = [bad.get("/api/v1/vms/").status_code for _ in range(5)]
    assert codes == [401, 401, 401, 429, 429]
    refused = AuditEvent.objects.filter(action="api.token.refused")
    assert refused.count() == 3 and "refused for 300 s" in refused.first().details["reason"]
    good = Client(HTTP_AUTHORIZATION=f"Bearer {token_for(operator)}")
    assert good.get("/api/v1/vms/").status_code == 200


def test_it_shows_a_new_token_once_on_the_users_page_and_revokes_it(alice, login):
    client = login(alice)
    created = client.post("/account/tokens/", {"name": "laptop", "expires_days": "30"})
    assert created.status_code == 200
    token = ApiToken.objects.get(user=alice)
    text = created.context["created"]["text"]
    assert text.startswith(f"kvmweb_{token.prefix}_") and text in created.content.decode()
    listing = client.get("/account/tokens/").content.decode()
    assert token.prefix in listing and text not in listing
    assert Client(HTTP_AUTHORIZATION=f"Bearer {text}").get("/api/v1/vms/").status_code == 200
    assert client.post(f"/account/tokens/{token.pk}/revoke/").status_code == 302
    token.refresh_from_db()
    assert token.revoked_at is not None
    assert Client(HTTP_AUTHORIZATION=f"Bearer {text}").get("/api/v1/vms/").status_code == 401
    revoke = AuditEvent.objects.get(action="api.token.revoke")
    assert revoke.actor == alice and revoke.outcome == AuditEvent.SUCCESS
