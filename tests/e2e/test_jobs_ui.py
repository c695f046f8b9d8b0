"""The job pages' conveniences in Chromium: a toast (and the bell's count) arriving live
when a job of yours ends while you are on another page; "Try again with …" on a failed
cold job opening the wizard prefilled (force off checked); and (lab) the cold move's
shutdown countdown with "Force off now" on a lab guest that ignores the ACPI shutdown.

Every wait follows readiness (Playwright's expect with generous limits: CI is slower than
a workstation); every process is started by the fixtures and stopped by its PID.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.e2e.test_browser import CHROMIUM, PASSWORD, REGISTER_LAB_HOSTS, ROOT, sign_in, snap

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed"),
]

TESTNODE = ROOT / "tests" / "data" / "testnode.xml"
LIVE = 60_000  # ms: what arrives through a socket (a poll interval or two, on a loaded CI)
SLOW = 240_000  # ms: what waits for a real guest and libvirt

MAKE_USER = f"""
from django.contrib.auth.models import Group, User
from kvmweb.accounts.roles import OPERATOR
u = User.objects.create_user({{name!r}}, password={PASSWORD!r})
u.groups.add(Group.objects.get(name=OPERATOR))
"""

# Two test-driver hosts (node files), an operator, and a job of theirs: running (for the
# toast) or failed while waiting for the guest to shut down (for "Try again").
WORLD = f"""
import json
from django.contrib.auth.models import Group, User
from django.utils import timezone
from hosts import services
from hosts.models import VM
from kvmweb.accounts.roles import OPERATOR
from migrations_app.models import JobEvent, MigrationJob
op = User.objects.create_user("e2e-operator", password={PASSWORD!r})
op.groups.add(Group.objects.get(name=OPERATOR))
a = services.do_register_host("kvm-a", "test://{{node_a}}", actor=op)
b = services.do_register_host("kvm-b", "test://{{node_b}}", actor=op)
vm = VM.objects.get(name="web1")
fields = dict(vm=vm, vm_name=vm.name, source=a, source_name=a.name, target=b, target_name=b.name,
              requested_by=op, requested_by_name=op.username)
if {{failed}}:
    job = MigrationJob.objects.create(mode="cold", status="failed", finished_at=timezone.now(),
        error="The guest did not shut down within 45 s and forcing it off was not allowed.",
        options={{"shutdown_timeout": 45, "force_off": False, "start_on_target": True}},
        journal=[{{"step": "begin", "state": "done", "was_running": True}},
                 {{"step": "shutdown", "state": "started"}}], **fields)
else:
    job = MigrationJob.objects.create(mode="live", status="running", started_at=timezone.now(), **fields)
JobEvent.objects.create(job=job, message="Started.")
print(json.dumps({{"job": job.pk, "vm": vm.pk, "target": b.pk}}))
"""

# What the runner's last step does (migrations_app/jobrun.py finish): the final
# transition, its job-log line and its migration.finish audit event, in one transaction.
FAIL_JOB = """
from migrations_app.lifecycle import transition
assert transition({job}, "failed", from_=("running",), error="The target refused the migration.",
                  event="The target refused the migration.", audit="migration.finish")
"""


def _world(site, *, failed):
    nodes = {}
    for name in ("a", "b"):
        nodes[name] = site.dir / f"node-{name}.xml"
        shutil.copy(TESTNODE, nodes[name])
    # Host b gets other UUIDs and names: the two hosts hold different VMs.
    text = nodes["b"].read_text().replace("55555555550", "66666666660")
    nodes["b"].write_text(text.replace("web1", "web2").replace("db1", "db2").replace("batch1", "batch2"))
    code = WORLD.replace("{node_a}", str(nodes["a"])).replace("{node_b}", str(nodes["b"]))
    return site.python(code.replace("{failed}", str(bool(failed))))


def test_it_toasts_and_counts_when_a_job_of_yours_ends(site, browser):
    from playwright.sync_api import expect

    ids = _world(site, failed=False)
    site.python(MAKE_USER.format(name="e2e-other"))
    site.start_web()
    mine, other = browser.new_page(), browser.new_page()  # two contexts: two sessions
    sign_in(mine, site, "e2e-operator")
    sign_in(other, site, "e2e-other")
    for page in (mine, other):
        page.goto(f"{site.url}/vms/")
        # The bell's socket is open and its snapshot is in: the page is listening.
        expect(page.locator("#bell-live[data-state=open] #bell[data-latest]")).to_have_count(1, timeout=LIVE)
    expect(mine.get_by_test_id("bell-count")).to_have_count(0)
    site.python(FAIL_JOB.format(job=ids["job"]))
    toast = mine.get_by_test_id("toast")
    expect(toast).to_have_text(f"Migration #{ids['job']} of web1 failed.", timeout=LIVE)
    expect(toast).to_have_attribute("href", f"/migrations/{ids['job']}/")
    expect(mine.get_by_test_id("bell-count")).to_have_text("1", timeout=LIVE)
    snap(mine, "bell-toast")
    # Another operator sees the job, but it is not theirs: no toast, no count.
    expect(other.locator("#bell[data-latest]")).to_have_count(1)
    assert other.get_by_test_id("toast").count() == 0 and other.get_by_test_id("bell-count").count() == 0
    # Marking read clears the count; the page never reloaded.
    mine.locator("#bell summary").click()
    mine.get_by_test_id("bell-mark-read").click()
    expect(mine.get_by_test_id("bell-count")).to_have_count(0, timeout=LIVE)
    assert mine.evaluate("performance.getEntriesByType('navigation').length") == 1


def test_it_opens_the_wizard_prefilled_from_try_again(site, browser):
    from playwright.sync_api import expect

    ids = _world(site, failed=True)
    site.start_web()
    page = browser.new_page()
    sign_in(page, site, "e2e-operator")
    page.goto(f"{site.url}/migrations/{ids['job']}/")
    link = page.get_by_test_id("job-retry-link")
    expect(link).to_be_visible(timeout=LIVE)
    expect(link).to_contain_text("Try again with")
    link.click()
    page.wait_for_url(f"{site.url}/migrations/new/?*", timeout=LIVE)
    assert f"retry={ids['job']}" in page.url and f"vm={ids['vm']}" in page.url
    # The options step of the same VM, target and mode, with force off now checked (the
    # job failed waiting for the shutdown) and the job's shutdown timeout kept.
    expect(page.locator("input[name=mode][value=cold]")).to_be_checked(timeout=LIVE)
    expect(page.locator("input[name=force_off]")).to_be_checked()
    expect(page.locator("input[name=shutdown_timeout]")).to_have_value("45")
    assert "web1" in page.inner_text("main") and "kvm-b" in page.inner_text("main")
    snap(page, "try-again-wizard")


@pytest.mark.lab
def test_it_counts_down_and_forces_off_a_guest_that_ignores_acpi(site, browser, lab, lab_guest):
    """A lab guest runs a boot sector, no OS: it never answers the ACPI shutdown."""
    from playwright.sync_api import expect

    guest = lab_guest("e2e-cold", host="lab-a", storage="shared")
    site.python(MAKE_USER.format(name="e2e-operator"))
    facts = site.python(REGISTER_LAB_HOSTS.format(root=str(ROOT), guest=guest.name), timeout=300)
    assert facts["vm_host"] == "lab-a"
    site.start_workers()
    site.start_web()
    page = browser.new_page()
    try:
        sign_in(page, site, "e2e-operator")
        out = site.manage(
            "migrate_vm", guest.name, "lab-b", "--mode", "cold", "--shutdown-timeout", "120",
            "--user", "e2e-operator", "--ack-all", "--json", timeout=300,
        )  # fmt: skip
        job = json.loads(out.strip().splitlines()[-1])["id"]
        page.goto(f"{site.url}/migrations/{job}/")
        # The shutdown wait: a countdown from the stored deadline, ticking in the page.
        countdown = page.get_by_test_id("job-countdown")
        expect(countdown).to_be_visible(timeout=SLOW)
        first = int(countdown.inner_text().split()[0])
        assert 0 < first <= 120
        page.wait_for_function(
            f"() => parseInt(document.querySelector('[data-testid=job-countdown]').innerText) < {first}",
            timeout=LIVE,
        )
        snap(page, "cold-countdown")
        force = page.get_by_test_id("job-force-off")
        expect(force).to_be_visible(timeout=LIVE)
        force.click()
        # The request is shown to every watcher, then the move goes on and finishes.
        expect(page.get_by_test_id("job-shutdown")).to_contain_text("forcing off now", timeout=LIVE)
        expect(page.locator("[data-testid=job-status].succeeded")).to_have_count(1, timeout=SLOW)
        expect(page.get_by_test_id("job-force-off")).to_have_count(0)
        snap(page, "cold-forced-off")
        audit = site.python(
            "import json; from kvmweb.audit.models import AuditEvent; "
            "print(json.dumps([[e.actor_name, e.outcome] for e in "
            "AuditEvent.objects.filter(action='migration.force_off')]))"
        )
        assert audit == [["e2e-operator", "success"]], audit
    except Exception:
        page.screenshot(path=str(site.dir / "failure.png"))
        print(site.logs(), file=sys.stderr)
        raise
    assert guest.name in lab.domain_names("lab-b")
    assert guest.name not in lab.domain_names("lab-a")


# A running job with a few progress samples (what the runner writes), for the chart.
RUNNING_WITH_SAMPLES = """
from datetime import timedelta
from django.db.models import F
from django.utils import timezone
from migrations_app.models import MigrationJob, ProgressSample
started = timezone.now() - timedelta(seconds=20)
MigrationJob.objects.filter(pk={job}).update(started_at=started, phase="memory", progress_at=timezone.now(),
    rate=100 << 20, memory_remaining=1 << 30, data_remaining=1 << 30, progress_seq=F("progress_seq") + 1)
for i in range(10):
    ProgressSample.objects.create(job_id={job}, t=2 * i, rate=(90 + i) << 20, remaining=(20 - i) << 26)
"""

# The convergence ladder's first step as the live mode takes it (migrations_app/modes/
# live.py ladder_step): the log line, then the progress write whose sample carries the mark.
LADDER_STEP = """
from django.db.models import F
from django.utils import timezone
from migrations_app.lifecycle import write_event
from migrations_app.models import MigrationJob
from migrations_app.streaming import publish_job
write_event({job}, ("policy_downtime", {{"ms": 600, "step": 1, "steps": 3}}), "warn")
MigrationJob.objects.filter(pk={job}).update(progress_at=timezone.now(), rate=120 << 20,
    progress_seq=F("progress_seq") + 1)
publish_job({job})
"""

MARK_INK = """(id) => {
  const c = document.getElementById('job-chart-' + id);
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let purple = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (d[i] === 0x7a && d[i + 1] === 0x3f && d[i + 2] === 0xb0) purple++;
  }
  return purple;
}"""


def test_it_draws_a_ladder_step_on_the_chart_of_a_page_already_open(site, browser):
    from playwright.sync_api import expect

    ids = _world(site, failed=False)
    site.python(RUNNING_WITH_SAMPLES.format(job=ids["job"]))
    site.start_web()
    page = browser.new_page()
    sign_in(page, site, "e2e-operator")
    page.goto(f"{site.url}/migrations/{ids['job']}/")
    expect(page.locator("#job-connection[data-state=open]")).to_have_count(1, timeout=LIVE)
    assert page.evaluate(MARK_INK, ids["job"]) == 0  # no step yet
    site.python(LADDER_STEP.format(job=ids["job"]))
    expect(page.locator(f"#job-events-{ids['job']} li[data-chart-mark='600 ms']")).to_have_count(
        1, timeout=LIVE
    )
    page.wait_for_function(f"() => ({MARK_INK})({ids['job']}) > 20", timeout=LIVE)
    snap(page, "chart-ladder-step")
    # A page opened now shows the same mark from the first load.
    late = browser.new_page()
    sign_in(late, site, "e2e-operator")
    late.goto(f"{site.url}/migrations/{ids['job']}/")
    late.wait_for_function(f"() => ({MARK_INK})({ids['job']}) > 20", timeout=LIVE)
