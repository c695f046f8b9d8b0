"""The pages a sysadmin uses every day, in Chromium: sorting and filtering the VM list,
every main page on a 390 px wide phone without sideways scrolling, and dark mode.

One site for the module (real daphne on a file SQLite database, test-driver hosts), each
test signing in as its own user (only the theme test changes a stored setting, of the
user only it uses); every process is started by the fixtures and stopped by its PID.
"""

import json
import shutil
from pathlib import Path

import pytest

from tests.e2e.test_browser import CHROMIUM, PASSWORD, ROOT, sign_in, snap
from tests.sites import Site

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed"),
]

TESTNODE = ROOT / "tests" / "data" / "testnode.xml"
LONG = "a-rather-long-vm-name-that-must-not-push-the-page-sideways-01"

WORLD = f"""
import json, uuid
from django.contrib.auth.models import Group, User
from django.db import transaction
from hosts import services
from hosts.models import VM, Host, HostGroup
from kvmweb.accounts.roles import ADMINISTRATOR, OPERATOR, SELF_SERVICE
from kvmweb.audit import record
from migrations_app.models import JobEvent, MigrationJob
admin = User.objects.create_user("e2e-admin", password={PASSWORD!r})
admin.groups.add(Group.objects.get(name=ADMINISTRATOR))
op = User.objects.create_user("e2e-operator", password={PASSWORD!r})
op.groups.add(Group.objects.get(name=OPERATOR))
owner = User.objects.create_user("e2e-owner", password={PASSWORD!r})
owner.groups.add(Group.objects.get(name=SELF_SERVICE))
HostGroup.objects.create(name="production-rack-with-a-long-name")
a = services.do_register_host("kvm-a.example.internal", "test://{{node_a}}", actor=admin)
b = services.do_register_host("kvm-b.example.internal", "test://{{node_b}}", actor=admin)
for i in range(12):
    VM.objects.create(uuid=uuid.uuid4(), name=f"app-{{i:02d}}", host=b, state="running" if i % 2 else "shutoff",
                      memory=(1 + i) << 30, vcpus=1 + i % 4, owner_user=owner if i < 3 else None)
long_vm = VM.objects.create(uuid=uuid.uuid4(), name={LONG!r}, host=a, state="running", memory=3 << 30)
web = VM.objects.get(name="web1")
job = MigrationJob.objects.create(vm=web, vm_name=web.name, source=a, source_name=a.name, target=b,
    target_name=b.name, mode="live", status="failed", requested_by=op, requested_by_name=op.username,
    error="The target refused the migration: " + "x" * 120)
JobEvent.objects.create(job=job, message="Started.")
with transaction.atomic():
    event = record("migration.request", actor=op, target=job,
                   details={{"plan": {{"mode": "live", "flags": ["LIVE", "PEER2PEER", "PERSIST_DEST"]}},
                            "virsh": "virsh migrate --live --p2p --persistent --undefinesource web1 "
                                     "qemu+ssh://root@kvm-b.example.internal/system"}})
print(json.dumps({{"host": a.pk, "vm": web.pk, "long": long_vm.pk, "job": job.pk, "event": event.pk}}))
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """One site for these tests: they read the same world and change nothing another reads."""
    site = Site(tmp_path_factory.mktemp("ui"))
    yield site
    site.stop()


@pytest.fixture(scope="module")
def world(site):
    nodes = {}
    for name in ("a", "b"):
        nodes[name] = site.dir / f"node-{name}.xml"
        shutil.copy(TESTNODE, nodes[name])
    # Host b gets other UUIDs/names so the two test hosts hold different VMs.
    text = nodes["b"].read_text().replace("55555555550", "66666666660")
    nodes["b"].write_text(text.replace("web1", "web2").replace("db1", "db2").replace("batch1", "batch2"))
    ids = site.python(WORLD.replace("{node_a}", str(nodes["a"])).replace("{node_b}", str(nodes["b"])))
    site.start_web()
    return ids


def names(page):
    return page.eval_on_selector_all(
        "table.vms tbody tr td:nth-child(2) a", "els => els.map(e => e.textContent)"
    )


def test_it_sorts_and_filters_the_vm_list(site, world, browser):
    page = browser.new_page()
    sign_in(page, site, "e2e-operator")
    page.goto(f"{site.url}/vms/")
    first = names(page)
    assert first == sorted(first) and len(first) == 19
    page.click("[data-testid=sort-name]")
    page.wait_for_url("**/vms/?sort=-name")
    assert names(page) == sorted(first, reverse=True)
    page.click("[data-testid=sort-memory]")
    page.wait_for_url("**sort=memory")
    memory = page.eval_on_selector_all(
        "table.vms tbody tr td:nth-child(6)", "els => els.map(e => e.textContent.trim())"
    )
    gib = [float(m.split()[0]) * (1 / 1024 if m.endswith("MiB") else 1) for m in memory]
    assert gib == sorted(gib) and memory[-1] == "12 GiB", memory  # binary units, smallest first
    # Filter as you type: the rows follow without a page load, the URL keeps the state.
    page.evaluate("window.__same_page = true")
    page.fill("[data-testid=vm-filter]", "app-0")
    page.wait_for_function("() => document.querySelectorAll('table.vms tbody tr').length === 10")
    assert all(n.startswith("app-0") for n in names(page))
    assert page.evaluate("window.__same_page") is True  # no full reload happened
    page.wait_for_url("**q=app-0**")
    assert "sort=memory" in page.url  # the sort survives the filter
    # Multi-select: the bar counts what is picked (and hides when nothing is).
    assert page.is_hidden("[data-selbar=vm]")
    page.check("input[data-select-all=vm]")
    page.wait_for_selector("[data-selbar=vm]:not([hidden])")
    assert page.inner_text("[data-selcount=vm]") == "10"
    page.uncheck("table.vms tbody tr:nth-child(1) input[data-select=vm]")
    assert page.inner_text("[data-selcount=vm]") == "9"
    snap(page, "vm-list-filtered")
    # Reloading the pushed URL gives the same view.
    page.reload()
    assert len(names(page)) == 10 and page.input_value("[data-testid=vm-filter]") == "app-0"


def main_pages(ids):
    return [
        "/",
        "/hosts/",
        f"/hosts/{ids['host']}/",
        "/hosts/add/",
        "/vms/",
        f"/vms/{ids['vm']}/",
        f"/vms/{ids['long']}/",
        "/migrations/",
        f"/migrations/{ids['job']}/",
        f"/migrations/new/?vm={ids['vm']}",
        "/audit/",
        f"/audit/{ids['event']}/",
        "/migrations/approvals/",
        "/accounts/users/",
        "/host-groups/",
        "/vms/ownership/",
    ]


OVERFLOW = """() => {
  const width = window.innerWidth;
  const wide = [];
  for (const el of document.querySelectorAll('body *')) {
    const r = el.getBoundingClientRect();
    if (r.right > width + 1 && getComputedStyle(el).position !== 'fixed') {
      let p = el.parentElement, clipped = false;
      while (p) { const o = getComputedStyle(p).overflowX; if (o === 'auto' || o === 'scroll' || o === 'hidden') { clipped = true; break; } p = p.parentElement; }
      if (!clipped) wide.push(el.tagName + '.' + el.className + ' ' + Math.round(r.right));
    }
  }
  return {scroll: document.documentElement.scrollWidth, width, wide: wide.slice(0, 5)};
}"""


def test_it_fits_every_main_page_on_a_390px_screen(site, world, browser):
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=1)
    page = context.new_page()
    sign_in(page, site, "e2e-admin")
    for path in main_pages(world):
        response = page.goto(f"{site.url}{path}")
        assert response.status == 200, path
        page.wait_for_load_state("load")
        result = page.evaluate(OVERFLOW)
        snap(page, "narrow" + path.replace("/", "_"))
        assert result["scroll"] <= result["width"], (path, result)
    context.close()
    # The sign-in page too, signed out.
    context = browser.new_context(viewport={"width": 390, "height": 844})
    page = context.new_page()
    page.goto(f"{site.url}/login/")
    result = page.evaluate(OVERFLOW)
    assert result["scroll"] <= result["width"], ("/login/", result)
    context.close()


BACKGROUND = "getComputedStyle(document.body).backgroundColor"


def test_it_follows_the_system_colour_scheme_and_remembers_a_choice(site, world, browser):
    context = browser.new_context(color_scheme="dark")
    page = context.new_page()
    sign_in(page, site, "e2e-owner")
    assert page.get_attribute("html", "data-theme") == "auto"
    dark = page.evaluate(BACKGROUND)
    assert dark == "rgb(15, 21, 28)", dark
    page.emulate_media(color_scheme="light")
    assert page.evaluate(BACKGROUND) == "rgb(246, 247, 249)"
    # Choose dark on a light system: the switch posts, the page comes back dark.
    page.goto(f"{site.url}/vms/")
    with page.expect_navigation():
        page.select_option("[data-testid=theme]", "dark")
    assert page.url.endswith("/vms/")
    assert page.get_attribute("html", "data-theme") == "dark"
    assert page.evaluate(BACKGROUND) == dark
    snap(page, "dark-vms")
    context.close()
    # Another browser, light system: the account remembers dark.
    other = browser.new_context(color_scheme="light")
    page = other.new_page()
    sign_in(page, site, "e2e-owner")
    assert page.get_attribute("html", "data-theme") == "dark"
    assert page.evaluate(BACKGROUND) == dark
    with page.expect_navigation():
        page.select_option("[data-testid=theme]", "light")
    assert page.get_attribute("html", "data-theme") == "light"
    other.close()
    stored = site.python(
        "import json; from kvmweb.accounts.models import UserPreference; "
        "print(json.dumps(UserPreference.objects.get(user__username='e2e-owner').theme))"
    )
    assert stored == "light"


def test_it_serves_the_favicon(site, world, browser):
    page = browser.new_page()
    response = page.goto(f"{site.url}/favicon.ico")
    assert response.status == 200 and "svg" in response.headers["content-type"]
    assert json.dumps(response.url).endswith('favicon.svg"')


def test_it_preselects_a_mode_that_fits_a_shut_off_vm_and_shows_only_its_options(site, world, browser):
    vm = site.python(
        "import json; from hosts.models import VM; print(json.dumps(VM.objects.get(name='app-00').pk))"
    )
    page = browser.new_page()
    sign_in(page, site, "e2e-operator")
    # Asked for Live (an old link, or a habit): the wizard picks a mode that fits instead.
    page.goto(f"{site.url}/migrations/new/?vm={vm}&target={world['host']}&mode=live")
    assert page.is_checked("[data-testid=mode-offline]")
    assert page.is_disabled("[data-testid=mode-live]") and page.is_disabled("[data-testid=mode-live-copy]")
    assert "needs a running VM" in page.inner_text("[data-testid=mode-why-live]")
    # Only the chosen mode's options show: Offline has no bandwidth and no force off.
    assert page.is_hidden("[data-option=bandwidth]") and page.is_hidden("[data-option=force_off]")
    assert page.is_visible("[data-option=persist]")
    page.check("[data-testid=mode-cold]")
    page.wait_for_selector("[data-option=force_off]:not([hidden])")
    assert page.is_visible("[data-option=shutdown_timeout]") and page.is_hidden("[data-option=bandwidth]")
    snap(page, "wizard-modes-shut-off")
