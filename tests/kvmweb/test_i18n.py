"""The Simplified Chinese catalog: complete, compiled, consistent with its source, and
actually used (language switch, a signed-in page, messages built in Python code).

The .po is read with a small parser below (no polib dependency)."""

import gettext
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from django.conf import settings
from django.utils import translation

from hosts import hypervisor
from hosts.models import VM, Host
from hosts.uris import InvalidURI, validate_uri

LOCALE = Path(settings.BASE_DIR) / "locale" / "zh_Hans" / "LC_MESSAGES"
PO = LOCALE / "django.po"
MO = LOCALE / "django.mo"
PLACEHOLDER = re.compile(r"%(?:\([A-Za-z_]\w*\))?[-#0 +]*\d*(?:\.\d+)?[sdrifgx%]")
TAG = re.compile(r"</?[A-Za-z][^>]*>")


def _unquote(text):
    text = text.strip()
    assert text.startswith('"') and text.endswith('"'), text
    escapes = {"n": "\n", "t": "\t", '"': '"', "\\": "\\", "r": "\r"}
    return re.sub(r"\\(.)", lambda m: escapes[m.group(1)], text[1:-1])


def parse_po(path):
    """Entries of a .po file as dicts: flags (set), msgctxt, msgid, msgid_plural,
    msgstr (list of strings, one per plural form), obsolete (bool)."""
    entries, current, key = [], None, None

    def flush():
        if current and ("msgid" in current or current["obsolete"]):
            entries.append(current)

    for line in path.read_text(encoding="utf-8").splitlines() + [""]:
        if not line.strip():
            flush()
            current, key = None, None
            continue
        if current is None:
            current = {"flags": set(), "msgstr": [], "obsolete": False}
        if line.startswith("#~"):
            current["obsolete"] = True
        elif line.startswith("#,"):
            current["flags"] |= {flag.strip() for flag in line[2:].split(",") if flag.strip()}
        elif line.startswith("#"):
            continue
        else:
            match = re.match(r"^(msgctxt|msgid_plural|msgid|msgstr(?:\[\d+\])?)\s+(\".*\")$", line)
            if match:
                key, value = match.group(1), _unquote(match.group(2))
                if key.startswith("msgstr"):
                    current["msgstr"].append(value)
                else:
                    current[key] = value
            elif key.startswith("msgstr"):
                current["msgstr"][-1] += _unquote(line)
            else:
                current[key] += _unquote(line)
    return entries


@pytest.fixture(scope="module")
def entries():
    parsed = parse_po(PO)
    return [e for e in parsed if e.get("msgid") != "" and not e["obsolete"]]


def test_it_has_a_catalog_with_chinese_plural_rules():
    header = next(e for e in parse_po(PO) if e.get("msgid") == "")
    assert "fuzzy" not in header["flags"]
    assert "Plural-Forms: nplurals=1; plural=0;" in header["msgstr"][0]
    assert "Content-Type: text/plain; charset=UTF-8" in header["msgstr"][0]


def test_it_leaves_no_entry_untranslated_or_fuzzy(entries):
    assert len(entries) > 500
    untranslated = [e["msgid"] for e in entries if not e["msgstr"] or not all(e["msgstr"])]
    fuzzy = [e["msgid"] for e in entries if "fuzzy" in e["flags"]]
    assert untranslated == []
    assert fuzzy == []
    for entry in entries:
        if "msgid_plural" in entry:
            assert len(entry["msgstr"]) == 1, entry["msgid"]  # nplurals=1


def test_it_keeps_placeholders_and_markup(entries):
    for entry in entries:
        for msgstr in entry["msgstr"]:
            source = entry["msgid_plural"] if "msgid_plural" in entry else entry["msgid"]
            if "python-format" in entry["flags"]:
                assert sorted(PLACEHOLDER.findall(msgstr)) == sorted(PLACEHOLDER.findall(source)), source
            assert sorted(TAG.findall(msgstr)) == sorted(TAG.findall(source)), source


def test_it_translates_into_chinese(entries):
    """Every message with words in it comes out in Chinese, except the few that are
    technical tokens and stay as they are."""
    han = re.compile(r"[\u4e00-\u9fff]")
    untouched = {
        e["msgid"]
        for e in entries
        if re.search(r"[A-Za-z]{3}", e["msgid"]) and not any(han.search(s) for s in e["msgstr"])
    }
    assert untouched <= {
        "libvirt URI",
        "URI",
        "ACPI",
        "UUID",
        "CPU",
        "Hypervisor",
        "%(size)s/s",
        "%(mib)s MiB/s",
        "virsh %(c)s net-start %(n)s; virsh %(c)s net-autostart %(n)s",
        "virsh %(c)s pool-start %(p)s",
    }


def test_it_compiles_the_catalog(tmp_path):
    msgfmt = shutil.which("msgfmt")
    if msgfmt is None:
        pytest.skip("gettext's msgfmt is not installed")
    out = tmp_path / "django.mo"
    result = subprocess.run(
        [msgfmt, "--check", "--statistics", "-o", str(out), str(PO)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "untranslated" not in result.stderr and "fuzzy" not in result.stderr, result.stderr
    assert out.stat().st_size > 0


def test_it_ships_a_compiled_catalog_in_step_with_the_po(entries):
    """The committed .mo (so `make run` needs no gettext) holds every entry of the .po."""
    with MO.open("rb") as handle:
        catalog = gettext.GNUTranslations(handle)
    for entry in entries:
        if "msgid_plural" in entry:
            got = catalog.ngettext(entry["msgid"], entry["msgid_plural"], 1)
        elif "msgctxt" in entry:
            got = catalog.pgettext(entry["msgctxt"], entry["msgid"])
        else:
            got = catalog.gettext(entry["msgid"])
        assert got == entry["msgstr"][0], entry["msgid"]


@pytest.mark.django_db
def test_it_switches_the_language_of_the_login_page(client):
    page = client.get("/login/").content.decode()
    assert "Sign in to kvmweb" in page
    assert '<html lang="en"' in page

    response = client.post("/i18n/setlang/", {"language": "zh-hans", "next": "/login/"})
    assert response.status_code == 302
    assert response.cookies[settings.LANGUAGE_COOKIE_NAME].value == "zh-hans"

    page = client.get("/login/").content.decode()
    assert '<html lang="zh-hans"' in page
    assert "登录 kvmweb" in page
    assert "用户名" in page and "密码" in page
    assert "Sign in to kvmweb" not in page

    client.post("/i18n/setlang/", {"language": "en", "next": "/login/"})
    assert "Sign in to kvmweb" in client.get("/login/").content.decode()


@pytest.mark.django_db
def test_it_renders_the_admin_dashboard_in_chinese(admin, login, node_xml):
    host = Host.objects.create(name=f"i18n-{uuid.uuid4().hex[:6]}", uri=f"test://{node_xml()}")
    VM.objects.create(uuid=uuid.uuid4(), name="i18n-vm", host=host, state=VM.RUNNING)
    client = login(admin)
    client.post("/i18n/setlang/", {"language": "zh-hans", "next": "/"})
    response = client.get("/")
    assert response.status_code == 200
    page = response.content.decode()
    for text in (
        "仪表盘",
        "宿主机",
        "虚拟机",
        "迁移",
        "审计",
        "最近的迁移",
        "虚拟机状态统计",
        "运行中",
        "退出登录",
    ):
        assert text in page, text
    for text in ("Dashboard", "Recent migrations", "VMs by state", "Sign out"):
        assert text not in page, text


def test_it_translates_messages_built_in_python():
    with translation.override("zh-hans"):
        with pytest.raises(InvalidURI) as empty:
            validate_uri("")
        with pytest.raises(InvalidURI) as refused:
            validate_uri("qemu+ssh://root@kvm1/system?command=/bin/echo")
        with pytest.raises(hypervisor.HypervisorTimeout) as slow:
            hypervisor._bounded(lambda: __import__("time").sleep(0.5), 0.01, "x")
    assert str(empty.value) == "请输入 libvirt URI，例如 qemu+ssh://root@host/system。"
    assert "它会在 kvmweb 所在机器上运行程序" in str(refused.value)
    assert str(slow.value) == "x在 0.01 秒内没有响应。"
    assert slow.value.remedy.startswith("宿主机或其 libvirtd")
    with translation.override("en"):
        with pytest.raises(InvalidURI) as english:
            validate_uri("")
    assert str(english.value) == "Enter a libvirt URI, for example qemu+ssh://root@host/system."


@pytest.mark.django_db
def test_it_shows_the_vm_page_and_its_history_in_chinese(admin, login, node_xml):
    from hosts import services as host_services

    host = host_services.do_register_host(f"i18n-{uuid.uuid4().hex[:6]}", f"test://{node_xml()}")
    vm = VM.objects.filter(host=host).order_by("name").first()
    client = login(admin)
    client.post("/i18n/setlang/", {"language": "zh-hans", "next": "/"})
    page = client.get(f"/vms/{vm.pk}/").content.decode()
    assert "时间线" in page  # "Timeline"
    assert f"出现在 {host.name} 上（同步）" in page  # the VM history's "seen on HOST (sync)"
    client.post("/i18n/setlang/", {"language": "en", "next": "/"})
    page = client.get(f"/vms/{vm.pk}/").content.decode()
    assert f"seen on {host.name} (sync)" in page
