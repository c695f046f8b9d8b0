"""Browser-test fixtures shared by the e2e modules: Debian's Chromium driven by Playwright
(the kvmweb site itself is the `site` fixture of tests/conftest.py, tests/sites.py)."""

import pytest

from tests.e2e.test_browser import CHROMIUM, CHROMIUM_ARGS

# ms: how long a Playwright action, wait or expect() waits when a test names no limit.
# Playwright's own defaults (30 s for actions and waits, 5 s for expect) are tight for a
# page served by daphne and drawn by Chromium on a loaded 2-core CI machine. A limit is a
# backstop only: each wait returns as soon as the page gets there.
DEFAULT_WAIT = 60_000


class Chromium:
    """The module's Chromium; every page and context it opens waits up to DEFAULT_WAIT
    by default (Playwright sets default timeouts per context, not per browser)."""

    def __init__(self, browser):
        self._browser = browser

    def __getattr__(self, name):
        return getattr(self._browser, name)

    def new_context(self, **kwargs):
        context = self._browser.new_context(**kwargs)
        context.set_default_timeout(DEFAULT_WAIT)
        return context

    def new_page(self, **kwargs):
        page = self._browser.new_page(**kwargs)  # a context of its own
        page.context.set_default_timeout(DEFAULT_WAIT)
        return page


@pytest.fixture(scope="module")
def chromium():
    """One Chromium per module: starting it costs seconds."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=DEFAULT_WAIT)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def browser(chromium):
    """The module's Chromium; what a test opens in it (pages, contexts: each page of
    browser.new_page() has its own context, so no cookie carries over) is closed after the
    test, before its site stops: an open WebSocket would hold daphne's shutdown."""
    yield Chromium(chromium)
    for context in chromium.contexts:
        context.close()
