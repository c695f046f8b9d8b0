"""The site-wide display filters: binary units and times (local with zone, UTC on hover,
relative)."""

from datetime import UTC, datetime, timedelta

import pytest
from django.template import Context, Template
from django.utils import timezone, translation

from kvmweb.accounts.templatetags.kvmweb_format import binary_size, relative


@pytest.mark.parametrize(
    ("value", "unit", "text"),
    [
        (0, "B", "0 B"),
        (1023, "B", "1023 B"),
        (128 << 20, "B", "128 MiB"),
        (1536 << 20, "B", "1.5 GiB"),
        (64 << 30, "B", "64 GiB"),
        (2048, "MiB", "2 GiB"),
        (300 << 30, "B", "300 GiB"),
        (None, "B", "—"),
    ],
)
def test_it_shows_binary_units(value, unit, text):
    assert binary_size(value, unit) == text


def render(source, **context):
    return Template(source).render(Context(context))


def test_it_is_a_builtin_filter_for_every_template():
    assert render("{{ n|bytes }} {{ m|bytes:'MiB' }}", n=3 << 30, m=512) == "3 GiB 512 MiB"


def test_it_shows_local_time_with_the_zone_and_utc_on_hover(settings):
    at = datetime(2026, 12, 2, 17, 32, 52, tzinfo=UTC)
    with timezone.override("Asia/Shanghai"):
        html = render("{{ at|when }}", at=at)
    assert ">2026-12-03 01:32:52 CST</time>" in html
    assert 'title="2026-12-02 17:32:52 UTC"' in html and 'datetime="2026-12-02T17:32:52+00:00"' in html
    assert "2026-12-02 17:32 UTC" in render("{{ at|when:'short' }}", at=at)
    assert render("{{ at|when }}", at=None) == "—"
    # Stored ISO strings (job results, audit details) read the same way.
    assert "17:32:52 UTC" in render("{{ at|when }}", at="2026-12-02T17:32:52+00:00")


def test_it_says_how_long_ago_in_the_users_language():
    now = timezone.now()
    assert relative(now - timedelta(minutes=3), now) == "3\xa0minutes ago"
    assert relative(now + timedelta(hours=2, minutes=5), now) == "in 2\xa0hours"
    assert relative(now - timedelta(seconds=5), now) == "just now"
    html = render("{{ at|when:'ago' }}", at=now - timedelta(minutes=3))
    assert "minutes ago</time>" in html and "UTC" in html
    with translation.override("zh-hans"):
        assert "前" in relative(now - timedelta(minutes=3), now)
