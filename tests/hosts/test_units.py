"""Sizes in binary units and one host-memory definition on every page; times with their
zone and the exact UTC time on hover."""

import re

import pytest
from django.urls import reverse

from hosts import services
from hosts.models import VM

pytestmark = pytest.mark.django_db


def test_it_shows_host_memory_the_same_way_everywhere(node_xml, login, operator):
    host = services.do_register_host("a", f"test://{node_xml('a')}")
    client = login(operator)
    pages = [reverse("dashboard"), reverse("hosts:list"), reverse("hosts:detail", args=[host.pk])]
    shown = set()
    for url in pages:
        body = client.get(url).content.decode()
        found = re.findall(r"[\d.]+ (?:B|[KMGT]iB) free of 64 GiB", body)
        assert found, url
        shown |= set(found)
        assert not re.search(r"\d (KB|MB|GB|TB)\b", body), url  # no decimal-looking units
    assert len(shown) == 1  # the same figure, written the same way


def test_it_shows_vm_memory_in_binary_units_on_list_and_page(node_xml, login, operator):
    services.do_register_host("a", f"test://{node_xml('a')}")
    web = VM.objects.get(name="web1")  # 2048 MiB
    client = login(operator)
    assert '<td class="num">2 GiB</td>' in client.get(reverse("hosts:vm_list")).content.decode()
    body = client.get(reverse("hosts:vm_detail", args=[web.pk])).content.decode()
    assert "<dd>2 GiB</dd>" in body


def test_it_shows_times_with_their_zone_and_utc_on_hover(node_xml, login, operator, settings):
    settings.TIME_ZONE = "Europe/Paris"
    host = services.do_register_host("a", f"test://{node_xml('a')}")
    body = login(operator).get(reverse("hosts:detail", args=[host.pk])).content.decode()
    stamp = re.search(r'<time datetime="([^"]+)" title="([^"]+) UTC">([^<]+)</time>', body)
    assert stamp is not None
    assert stamp.group(3).endswith(("CET", "CEST")) and stamp.group(1).endswith("+00:00")
    assert "ago" in body or "just now" in body
