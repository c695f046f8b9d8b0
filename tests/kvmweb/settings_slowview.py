"""kvmweb's settings plus one slow page (tests/kvmweb/slow_urls.py): a request that is
still in its view when the server is asked to stop (tests/kvmweb/test_graceful_stop.py)."""

from kvmweb.settings import *  # noqa: F403

ROOT_URLCONF = "tests.kvmweb.slow_urls"
