"""Browser-test fixtures shared by the e2e modules: Debian's Chromium driven by Playwright
(the kvmweb site itself is the `site` fixture of tests/conftest.py, tests/sites.py)."""

import pytest

from tests.e2e.test_browser import CHROMIUM, CHROMIUM_ARGS


@pytest.fixture(scope="module")
def chromium():
    """One Chromium per module: starting it costs seconds."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def browser(chromium):
    """The module's Chromium; what a test opens in it (pages, contexts: each page of
    browser.new_page() has its own context, so no cookie carries over) is closed after the
    test, before its site stops: an open WebSocket would hold daphne's shutdown."""
    yield chromium
    for context in chromium.contexts:
        context.close()
