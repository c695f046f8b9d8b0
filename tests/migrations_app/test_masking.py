"""Host masking (migrations_app/masking.py): one helper decides what a viewer reads of
hosts, on pages and in live fragments alike. A self-service user who now owns a VM that
once ran on a host outside their scope reads "another host"; libvirt URIs are for
administrators only."""

import pytest
from django.db.models import F
from django.urls import reverse

from migrations_app import streaming
from migrations_app.masking import HostMask
from migrations_app.models import JobEvent, MigrationJob
from tests.accounts.world import build
from tests.migrations_app.conftest import SECRET_URI

pytestmark = pytest.mark.django_db


@pytest.fixture
def past(secret_move):
    """alice-web, now alice's, was moved by an operator from the secret host s1."""
    return secret_move()


def test_it_masks_hidden_names_and_uris_by_viewer(past, admin, operator, alice):
    texts = {}
    for user in (admin, operator, alice):
        mask = HostMask.for_user(user)
        shown = mask.job(past)
        event = mask.event(JobEvent.objects.get(job=past), past)
        texts[user.username] = (shown.source_name, shown.error, event.message)
    assert texts["admin"] == ("s1-secret", past.error, f"Connected to s1-secret ({SECRET_URI}).")
    assert texts["operator"] == (
        "s1-secret",
        "libvirt at <s1-secret> answered slowly",
        "Connected to s1-secret (<s1-secret>).",
    )
    assert texts["alice"] == (
        "another host",
        "libvirt at <another host> answered slowly",
        "Connected to another host (<another host>).",
    )
    with pytest.raises(TypeError):
        HostMask.for_user(alice).job(past).save()


def test_it_masks_the_job_list_and_job_page_for_the_owner(past, login, alice):
    client = login(alice)
    for url in (
        reverse("migrations:list"),
        reverse("migrations:detail", args=[past.pk]),
        reverse("dashboard"),
    ):
        body = client.get(url).content.decode()
        assert "alice-web" in body and "another host" in body, url
        assert "s1-secret" not in body and SECRET_URI not in body, url


def test_it_renders_live_fragments_once_per_masking_variant(past, admin, operator, auditor, alice):
    hub = streaming.JobHub()
    viewers = {u.pk: u for u in (admin, operator, auditor, alice)}
    job_langs = {past.pk: {("en", pk) for pk in viewers}}
    restricted = {alice.pk: (alice, {"en"})}
    hub._read_and_render(job_langs, {"en"}, restricted, viewers)  # start: remembers the current state
    JobEvent.objects.create(job=past, message=f"Still talking to s1-secret at {SECRET_URI}.")
    MigrationJob.objects.filter(pk=past.pk).update(progress_seq=F("progress_seq") + 1, percent=42.0)
    renders = hub.renders
    result = hub._read_and_render(job_langs, {"en"}, restricted, viewers)

    def progress(user):
        return result.progress[(past.pk, "en", result.variants[(past.pk, user.pk)])][1]

    def event(user):
        (_eid, html), *_ = result.events[past.pk]
        return html[("en", result.variants[(past.pk, user.pk)])]

    assert SECRET_URI in progress(admin) and SECRET_URI in event(admin)
    for staff in (operator, auditor):
        assert SECRET_URI not in progress(staff) + event(staff) and "s1-secret" in event(staff)
    assert SECRET_URI not in progress(alice) + event(alice) and "s1-secret" not in event(alice)
    (_pk, row), *_ = result.user_rows[(alice.pk, "en")]
    assert "another host" in row and "s1-secret" not in row
    assert "s1-secret" in result.rows["en"][0][1]  # watchers who see every host
    # Three variants (administrator, other staff, alice): three progress renders, not
    # four; then the shared list row and alice's own row.
    assert hub.renders - renders == 3 + 1 + 1


def test_it_hides_uris_in_the_preflight_checklist_from_non_administrators(alice, bob, admin, login):
    """The dry run's checklist names both hosts' URIs in its findings, remedies, details
    and virsh line (the target here cannot be reached: its error names its URI)."""
    w = build(alice, bob)
    url = reverse("migrations:preflight_check")
    query = {"vm": w.bob_db.pk, "target": w.d1.pk, "mode": "live"}
    body = login(bob).get(url, query).content.decode()
    assert "Preflight checklist" in body and "d1-dev-host" in body
    assert "test:///" not in body and "&lt;d1-dev-host&gt;" in body
    body = login(admin).get(url, query).content.decode()
    assert "test:///d1" in body and "test:///default" in body
