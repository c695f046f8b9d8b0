"""The proof on real processes over loopback: daphne serving the API with a token made by
`manage.py api_token`, the workers running a lab migration requested only through the API,
the webhook receiver verifying the signed notification, and /metrics counting the job."""

import re
import time

import pytest

from tests.api.test_metrics import sample

MAKE_OPERATOR = (
    "from django.contrib.auth.models import Group, User; "
    "u = User.objects.create_user('ops', password='x' * 20); "
    "u.groups.add(Group.objects.get(name='Operator')); print('{}')"
)


def _wait(what, check, timeout, site):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not reached in {timeout} s\n{site.logs()}"
        time.sleep(0.2)


def test_it_answers_over_daphne_with_a_token_from_the_command(site):
    site.python(MAKE_OPERATOR)
    token = site.manage("api_token", "ops", "--expires", "1").strip()
    assert re.fullmatch(r"kvmweb_[0-9a-f]{8}_\S+", token)
    site.start_web()
    status, _headers, body = site.request("GET", "/api/v1/", token=token)
    assert status == 200 and body["user"] == "ops"
    status, headers, _ = site.request("GET", "/api/v1/vms/", token=token[:-2] + "xx")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    status, _h, _b = site.request("GET", "/hosts/", token=token)  # an HTML page: the token is no sign-in
    assert status == 200 and "/login/" in _b  # (urllib followed the redirect to the sign-in page)
    status, _h, schema = site.request("GET", "/api/v1/schema/?format=json")
    assert status == 200 and schema["openapi"].startswith("3.")
    status, _h, html = site.request("GET", "/api/v1/docs/")
    bundle = re.search(r'src="(/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle\.js)"', html)
    assert bundle and site.request("GET", bundle[1])[0] == 200  # served locally
    status, _h, metrics = site.request("GET", "/metrics")
    assert status == 200 and "kvmweb_audit_events_total" in metrics
    refused = site.python(
        "import json; from kvmweb.audit.models import AuditEvent; "
        "print(json.dumps(list(AuditEvent.objects.filter(action__startswith='api.token')"
        ".values_list('action', 'outcome', 'actor_name'))))"
    )
    assert ["api.token.create", "success", "ops"] in refused and [
        "api.token.refused",
        "denied",
        "ops",
    ] in refused


@pytest.mark.lab
def test_it_runs_a_lab_migration_requested_only_through_the_api(site, lab, lab_guest, webhook):
    import lab as labkit

    # Workers first: a default-cluster worker queues the due watch loops (the notification
    # dispatcher among them) as it starts (migrations_app/apps.py); meanwhile we set up.
    site.start_workers()
    # POST /jobs/ measures the dirty rate and needs every warning acknowledged, from the
    # quick report made before it: a guest read near half the link rate kvmweb learned
    # from the first job would add an unacknowledged warning to the second (lab.QUIET).
    guest = lab_guest("api", host="lab-a", storage="shared", **labkit.QUIET)
    for host in ("lab-a", "lab-b"):
        site.manage("add_host", host, labkit.uri(host))
    site.python(MAKE_OPERATOR)
    secret = site.python(
        "import json; from django.contrib.auth.models import User; "
        "from notifications.services import do_subscribe; "
        "admin = User.objects.create_superuser('root', password='x' * 20); "
        f"s = do_subscribe(admin, name='hook', kind='webhook', target='{webhook.url}', "
        "events=['job.succeeded', 'job.failed'], is_global=True); print(json.dumps(s.secret))"
    )
    webhook.secret = secret
    token = site.manage("api_token", "ops").strip()
    site.start_web()
    status, _h, vms = site.request("GET", f"/api/v1/vms/?q={guest.name}", token=token)
    assert status == 200 and vms["count"] == 1
    vm = vms["results"][0]
    status, _h, hosts = site.request("GET", "/api/v1/hosts/", token=token)
    target = next(h for h in hosts["results"] if h["name"] == "lab-b")
    plan = {"vm": vm["id"], "target": target["id"], "mode": "live"}
    status, _h, report = site.request("POST", "/api/v1/preflight/", dict(plan, quick=True), token=token)
    assert status == 200 and report["verdict"] != "fail", report
    warnings = [r["id"] for r in report["results"] if r["status"] == "warn"]
    body = dict(plan, acknowledged=warnings)
    key = {"Idempotency-Key": f"lab-{guest.name}"}
    started = time.monotonic()
    status, headers, job = site.request("POST", "/api/v1/jobs/", body, token=token, headers=key)
    assert status == 202, job
    job_url = headers["Location"]
    again = site.request("POST", "/api/v1/jobs/", body, token=token, headers=key)
    assert again[0] == 202 and again[2]["id"] == job["id"]  # the retry made no second job

    def finished():
        got = site.request("GET", job_url, token=token)[2]
        return got if got["status"] in ("succeeded", "failed", "cancelled") else None

    final = _wait("the job's end", finished, 240, site)
    assert final["status"] == "succeeded", final
    took = time.monotonic() - started
    ended = time.monotonic()
    assert labkit.where(guest) == {"lab-b": "running"}
    delivered = _wait(
        "the webhook", lambda: [r for r in webhook.requests if r["event"] == "job.succeeded"], 120, site
    )
    assert delivered[0]["verified"] and delivered[0]["body"]["job"]["id"] == job["id"]
    webhook_after = time.monotonic() - ended
    events = site.request("GET", job_url + "events/", token=token)[2]
    assert events and events[-1]["message"].startswith("Succeeded")
    metrics = site.request("GET", "/metrics")[2]
    assert sample(metrics, "kvmweb_migrations_total", mode="live", outcome="succeeded") == 1
    assert sample(metrics, "kvmweb_migration_duration_seconds_count", mode="live") == 1
    assert sample(metrics, "kvmweb_migration_bytes_total", mode="live") > 0
    assert sample(metrics, "kvmweb_host_up", host="lab-b") == 1
    # Back to lab-a with the dispatcher's loop surely running: the steady-state delay
    # between a job's end and its webhook.
    source = next(h for h in hosts["results"] if h["name"] == "lab-a")
    back = dict(plan, target=source["id"], acknowledged=warnings)
    status, headers, job2 = site.request("POST", "/api/v1/jobs/", back, token=token)
    assert status == 202, job2

    def finished_back():
        got = site.request("GET", headers["Location"], token=token)[2]
        return got if got["status"] in ("succeeded", "failed", "cancelled") else None

    assert _wait("the way back", finished_back, 240, site)["status"] == "succeeded"
    ended_back = time.monotonic()
    _wait(
        "the second webhook",
        lambda: [r for r in webhook.requests if r["body"]["job"]["id"] == job2["id"]],
        120,
        site,
    )
    steady = time.monotonic() - ended_back
    metrics = site.request("GET", "/metrics")[2]
    assert sample(metrics, "kvmweb_migrations_total", mode="live", outcome="succeeded") == 2
    print(
        f"\nAPI lab migration: {took:.1f} s from POST to succeeded, downtime {final['downtime_ms']} ms; "
        f"webhook {webhook_after:.1f} s after the first job's end (workers just started), "
        f"{steady:.1f} s after the second's (dispatcher running)"
    )
