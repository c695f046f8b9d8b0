"""Browser-test fixtures shared by the e2e modules: Debian's Chromium driven by Playwright
(the kvmweb site itself is the `site` fixture of tests/conftest.py, tests/sites.py)."""

import pytest

from tests.e2e.test_browser import CHROMIUM, CHROMIUM_ARGS


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()
