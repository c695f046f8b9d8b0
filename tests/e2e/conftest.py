"""Browser-test fixtures shared by the e2e modules: a kvmweb site in its own data dir
(daphne, and workers when asked) and Debian's Chromium driven by Playwright."""

import pytest

from tests.e2e.test_browser import CHROMIUM, CHROMIUM_ARGS, Site


@pytest.fixture
def site(tmp_path):
    site = Site(tmp_path)
    yield site
    site.stop()


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()
