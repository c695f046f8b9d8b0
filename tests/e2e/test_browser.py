"""The browser's view: Debian's Chromium (driven by Playwright) against a real daphne
process and real workers on a file SQLite database, the embedded default.

1. A running job streams to its page and to the dashboard: progress bar, figures, chart,
   event log, final figures; the dashboard row changes state without a reload.
2. (lab) Sign in, run the wizard on a lab guest, watch the progress bar reach done, see
   the VM on the target host's page (and libvirt agrees).

Every process is started here and stopped by its PID; the data dir is the test's tmp dir.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sites import PY, ROOT, Site, free_port  # noqa: F401 - Site, free_port: for other e2e modules

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
PASSWORD = "e2e correct horse battery"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed"),
]


def snap(page, name):
    """Keep a screenshot when KVMWEB_E2E_SCREENSHOTS names a directory (for people)."""
    where = os.environ.get("KVMWEB_E2E_SCREENSHOTS")
    if where:
        page.screenshot(path=str(Path(where) / f"{name}.png"), full_page=True)


def sign_in(page, site, username):
    page.goto(f"{site.url}/login/")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{site.url}/")


MAKE_OPERATOR = f"""
from django.contrib.auth.models import Group, User
from kvmweb.accounts.roles import OPERATOR
u = User.objects.create_user("e2e-operator", password={PASSWORD!r})
u.groups.add(Group.objects.get(name=OPERATOR))
"""

MAKE_JOB = """
import json, uuid
from django.utils import timezone
from hosts.models import VM, Host
from migrations_app.models import JobEvent, MigrationJob
a = Host.objects.create(name="e2e-a", uri="test:///e2e-a")
b = Host.objects.create(name="e2e-b", uri="test:///e2e-b")
vm = VM.objects.create(uuid=uuid.uuid4(), name="e2e-vm", host=a, state="running")
job = MigrationJob.objects.create(vm=vm, vm_name=vm.name, source=a, source_name=a.name, target=b,
    target_name=b.name, mode="live", status="{status}", requested_by_name="e2e-operator",
    started_at=timezone.now() if "{status}" == "running" else None)
JobEvent.objects.create(job=job, message="Claimed by the e2e writer.")
print(json.dumps(job.pk))
"""

# What the runner does, compressed: progress writes four times a second (row + sample +
# phase event), then the completed-job figures and the final state.
WRITE_PROGRESS = """
import time
from django.db import transaction
from django.db.models import F
from django.utils import timezone
from migrations_app.models import JobEvent, MigrationJob, ProgressSample
from migrations_app.streaming import publish_job
JOB = {job}
total = 2 << 30
job = MigrationJob.objects.get(pk=JOB)
MigrationJob.objects.filter(pk=JOB).update(status="running", started_at=timezone.now(), phase="setup",
    progress_seq=F("progress_seq") + 1)
publish_job(JOB)
time.sleep(0.5)
for i in range(1, 13):
    remaining = total - i * total // 12
    with transaction.atomic():
        MigrationJob.objects.filter(pk=JOB).update(
            phase="memory", percent=100.0 * (total - remaining) / total * 0.99, data_total=total,
            data_processed=total - remaining, data_remaining=remaining, memory_total=total,
            memory_processed=total - remaining, memory_remaining=remaining, rate=(200 + 10 * i) << 20,
            dirty_rate=8 << 20, iteration=1 + i // 6, eta_seconds=remaining / (200 << 20),
            progress_at=timezone.now(), progress_seq=F("progress_seq") + 1)
        job.refresh_from_db()
        ProgressSample.objects.create(job=job, t=(job.progress_at - job.started_at).total_seconds(),
            rate=job.rate, remaining=remaining, processed=total - remaining)
        if i == 1:
            JobEvent.objects.create(job=job, message="Phase: memory.")
    publish_job(JOB)
    time.sleep(0.25)
MigrationJob.objects.filter(pk=JOB).update(status="succeeded", phase="done", percent=100,
    downtime_ms=42, elapsed_ms=3400, finished_at=timezone.now(), progress_seq=F("progress_seq") + 1)
JobEvent.objects.create(job=job, message="Migration completed.")
publish_job(JOB)
print(1)
"""

CHART_INK = """(id) => {
  const c = document.getElementById('job-chart-' + id);
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let blue = 0, orange = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (d[i] === 0x1f && d[i + 1] === 0x5f && d[i + 2] === 0xa8) blue++;
    if (d[i] === 0xc2 && d[i + 1] === 0x5e && d[i + 2] === 0x00) orange++;
  }
  return [blue, orange];
}"""


def test_it_streams_a_job_to_its_page_and_the_dashboard(site, browser):
    site.python(MAKE_OPERATOR)
    job = site.python(MAKE_JOB.format(status="queued"))
    site.start_web()
    context = browser.new_context()
    dashboard = context.new_page()
    sign_in(dashboard, site, "e2e-operator")
    row_status = dashboard.locator(f"#job-row-{job} [data-testid=job-row-status]")
    assert row_status.inner_text() == "queued"
    page = context.new_page()
    page.goto(f"{site.url}/migrations/{job}/")
    page.wait_for_selector("#job-connection[data-state=open]")
    assert page.get_attribute(".progress", "aria-valuenow") == "0"
    # Queued: cancel only; the live controls come when it runs (state change refetch).
    assert page.locator("[data-testid=job-cancel]").is_visible()
    assert page.locator("input[name=bandwidth]").count() == 0

    writer = subprocess.Popen(
        [PY, "manage.py", "shell", "-v", "0", "-c", WRITE_PROGRESS.format(job=job)], cwd=ROOT, env=site.env
    )
    try:
        # The writer is a new Django process: on a loaded machine it takes a while to start.
        page.wait_for_selector("input[name=bandwidth]", timeout=60000)
        # Mid-way: the bar moves and the figures follow, without any reload.
        page.wait_for_function(
            "() => Number(document.querySelector('.progress').getAttribute('aria-valuenow')) >= 40",
            timeout=60000,
        )
        assert "MB/s" in page.inner_text("[data-testid=job-rate]")
        snap(page, "job-running")
        assert page.inner_text("[data-testid=job-phase]") == "memory"
        page.wait_for_function(
            "() => document.querySelector('.progress').getAttribute('aria-valuenow') === '100'", timeout=60000
        )
    finally:
        assert writer.wait(60) == 0
    page.wait_for_selector("[data-testid=job-downtime]")
    assert page.inner_text("[data-testid=job-status]") == "succeeded"
    page.wait_for_selector("[data-live-controls]", state="hidden")
    assert page.inner_text("[data-testid=job-downtime]") == "42 ms"
    events = page.inner_text(f"#job-events-{job}")
    assert "Claimed by the e2e writer." in events and "Phase: memory." in events
    assert "Migration completed." in events and events.count("Phase: memory.") == 1
    snap(page, "job-done")
    blue, orange = page.evaluate(CHART_INK, job)
    assert blue > 100 and orange > 100, (blue, orange)  # both lines drawn
    # The dashboard's row followed along in the other tab.
    dashboard.wait_for_function(
        f"() => document.querySelector('#job-row-{job} [data-testid=job-row-status]').innerText === 'succeeded'",
        timeout=60000,
    )
    snap(dashboard, "dashboard")
    # A browser arriving now gets the same final state at once (snapshot).
    late = context.new_page()
    late.goto(f"{site.url}/migrations/{job}/")
    late.wait_for_selector("#job-connection[data-state=open]")
    assert late.get_attribute(".progress", "aria-valuenow") == "100"
    assert late.evaluate(CHART_INK, job)[0] > 100
    context.close()


FINISH_JOB = """
from django.db.models import F
from django.utils import timezone
from migrations_app.models import JobEvent, MigrationJob
MigrationJob.objects.filter(pk={job}).update(status="succeeded", phase="done", percent=100, downtime_ms=17,
    elapsed_ms=2000, finished_at=timezone.now(), progress_at=timezone.now(), progress_seq=F("progress_seq") + 1)
JobEvent.objects.create(job_id={job}, message="Finished while nobody watched.")
"""


def test_it_catches_up_after_the_server_restarts(site, browser):
    """The socket drops (daphne restarts); the job finishes meanwhile; htmx reconnects and
    the snapshot brings the page to the final state, with each log line once."""
    site.python(MAKE_OPERATOR)
    job = site.python(MAKE_JOB.format(status="running"))
    site.start_web()
    page = browser.new_page()
    sign_in(page, site, "e2e-operator")
    page.goto(f"{site.url}/migrations/{job}/")
    page.wait_for_selector("#job-connection[data-state=open]")
    # htmx's default reconnect delay is random up to 2^n s (n = attempts so far): the
    # page could sit out 30 s before its next try. Retry every 200 ms; reconnecting and
    # the snapshot it brings are the page's own code.
    page.evaluate("htmx.config.wsReconnectDelay = () => 200")
    site.stop_web()
    page.wait_for_selector("#job-connection[data-state=closed]")
    site.python(FINISH_JOB.format(job=job))
    assert page.get_attribute(".progress", "aria-valuenow") == "0"
    site.start_web()
    page.wait_for_selector("#job-connection[data-state=open]", timeout=60000)
    page.wait_for_function(
        "() => document.querySelector('.progress').getAttribute('aria-valuenow') === '100'", timeout=60000
    )
    assert page.inner_text("[data-testid=job-status]") == "succeeded"
    assert page.inner_text("[data-testid=job-downtime]") == "17 ms"
    events = page.inner_text(f"#job-events-{job}")
    assert (
        events.count("Claimed by the e2e writer.") == 1
        and events.count("Finished while nobody watched.") == 1
    )
    assert page.locator("[data-live-controls]").is_hidden()


REGISTER_LAB_HOSTS = """
import json, sys
sys.path.insert(0, {root!r})
import lab
from hosts import services
from hosts.models import Host, VM
ids = {{}}
for name in ("lab-a", "lab-b"):
    ids[name] = services.do_register_host(name, lab.uri(name)).pk
vm = VM.objects.get(name={guest!r})
print(json.dumps({{"hosts": ids, "vm_host": vm.host.name}}))
"""


@pytest.mark.lab
def test_it_migrates_a_lab_guest_through_the_wizard_live(site, browser, lab, lab_guest):
    guest = lab_guest("e2e", host="lab-a", storage="shared")
    site.python(MAKE_OPERATOR)
    facts = site.python(REGISTER_LAB_HOSTS.format(root=str(ROOT), guest=guest.name), timeout=300)
    assert facts["vm_host"] == "lab-a"
    site.start_workers()
    site.start_web()
    page = browser.new_page()
    try:
        sign_in(page, site, "e2e-operator")
        page.goto(f"{site.url}/migrations/new/")
        page.click(f"[data-testid='pick-vm-{guest.name}']")
        page.click("[data-testid='pick-target-lab-b']", timeout=60000)
        page.check("input[name=mode][value=live]")
        page.click("[data-testid=wizard-run-preflight]")
        page.wait_for_selector("[data-testid=wizard-start]", timeout=120000)
        assert "migrate --live" in page.inner_text("[data-testid=wizard-virsh]")
        snap(page, "wizard-preflight")
        for box in page.locator("input[name=ack]").all():
            box.check()
        page.click("[data-testid=wizard-start]")
        page.wait_for_url(f"{site.url}/migrations/*/", timeout=120000)
        job = int(page.url.rstrip("/").rsplit("/", 1)[1])
        page.wait_for_selector("#job-connection[data-state=open]")
        # Live: the bar reaches 100 and the state says so, without a reload.
        page.wait_for_function(
            "() => document.querySelector('.progress').getAttribute('aria-valuenow') === '100'",
            timeout=240000,
        )
        page.wait_for_selector("[data-testid=job-status].succeeded", timeout=60000)
        assert page.inner_text("[data-testid=job-downtime]").endswith("ms")
        snap(page, "lab-job-done")
        assert page.evaluate(CHART_INK, job)[0] > 0
        page.goto(f"{site.url}/hosts/{facts['hosts']['lab-b']}/")
        assert guest.name in page.inner_text("main")
    except Exception:
        page.screenshot(path=str(site.dir / "failure.png"))
        print(site.logs(), file=sys.stderr)
        raise
    assert guest.name in lab.domain_names("lab-b")
    assert guest.name not in lab.domain_names("lab-a")


def teardown_module():
    shutil.rmtree(ROOT / "test-results", ignore_errors=True)
