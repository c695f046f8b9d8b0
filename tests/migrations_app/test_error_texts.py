"""A job's error sentences (migrations_app/events.py err_* codes) read in the viewer's
language: every code renders in Chinese, and a live job that fails shows its error in
Chinese on the job page while the English stays in MigrationJob.error."""

import re

import pytest
from django.urls import reverse
from django.utils import translation

from migrations_app import events, runner
from migrations_app.models import MigrationJob

# The error sentences, plus the lines said when a job fails or waits outside its error.
ERR_CODES = sorted(code for code in events.CATALOG if code.startswith("err_")) + [
    "missed_window",
    "retry_reattach",
    "retry_where",
    "migrate_not_returned",
]
HAN = re.compile(r"[\u4e00-\u9fff]")
# Parameter values chosen so no English word can come from them: what is left is the template's.
PARAMS = {
    "host": "h1",
    "source": "h1",
    "target": "h2",
    "state": "running",
    "src_state": "paused",
    "dst_state": "shut off",
    "error": "E-42",
    "timeout": "120",
    "step": "s1",
    "ms": 600,
    "path": "/v/d1",
    "dir": "/v",
    "reason": "r1",
    "checks": "C-1",
    "at": "2026-12-07 06:00:00",
    "place": {"code": "err_place_still", "params": {"state": "running", "host": "h1"}},
}


@pytest.mark.parametrize("code", ERR_CODES)
def test_it_renders_every_error_sentence_in_chinese(code):
    en = events.parts((code, PARAMS))[0]["en"]
    assert en != code, f"{code} did not format with the test parameters"
    with translation.override("zh-hans"):
        zh = events.render(code, PARAMS, en)
    assert HAN.search(zh) and zh != en
    # Only parameter values (h1, E-42, /v/d1, ...) and product names may stay in Latin letters.
    assert not re.search(r"[A-Za-z]{2,}", re.sub(r"\b(kvmweb|libvirtd?)\b", "", zh)), zh


def test_it_renders_nested_place_and_both_states_in_the_viewer_language():
    parts = events.parts(
        ("err_target_gone", {"place": {"code": "err_place_not_found", "params": {"host": "ha"}}}),
        ("err_live_both", {"src_state": "running", "source": "ha", "dst_state": "paused", "target": "hb"}),
    )
    assert events.english(parts) == (
        "The target host's libvirtd went away during the migration; the VM was not found on ha. "
        "The VM is running on ha and paused on hb: check which copy is the real one before starting anything."
    )
    with translation.override("zh-hans"):
        zh = " ".join(events.render(p["code"], p["params"], p["en"]) for p in parts)
    assert "在 ha 上找不到该虚拟机" in zh and "为运行中" in zh and "为已暂停" in zh


def test_it_shows_a_failed_live_job_in_chinese_on_its_page(
    world, passing_preflight, monkeypatch, operator, login
):
    # The whole worker path with the libvirt test driver: the runner claims the job, the
    # live mode calls migrate on test:///default, the target (test:///other) cannot be
    # reached, and explain_failure says where the VM is.
    monkeypatch.setattr(runner, "run_preflight", passing_preflight)
    job = MigrationJob.objects.create(
        vm=world["vm"],
        vm_name="web1",
        source=world["a"],
        source_name="ha",
        target=world["b"],
        target_name="hb",
        mode="live",
    )
    assert runner.run_job(job.pk, "w:1") == MigrationJob.FAILED
    job.refresh_from_db()
    assert [p["code"] for p in job.error_parts] == ["err_target_gone"]
    assert job.error == (
        "The target host's libvirtd went away during the migration; the VM is still running on ha."
    )
    client = login(operator)
    client.cookies["django_language"] = "zh-hans"
    page = client.get(reverse("migrations:detail", args=[job.pk]), HTTP_ACCEPT_LANGUAGE="zh-hans")
    shown = page.content.decode().split('data-testid="job-error"')[1].split("</p>")[0]
    assert "迁移期间目标主机的 libvirtd 已消失；虚拟机在 ha 上仍为运行中。" in shown
    assert "went away" not in shown
