"""``preflight_checked``: sent when a person's checklist run finishes (the dry-run page,
the wizard's preflight step), with ``report`` (a Report) and ``source`` ("dry_run",
"wizard").

The migrations app cannot import the API app (a layer above), so the API's metrics
subscribe to this signal (api/apps.py) instead of being called. Receivers must not raise;
``announce`` logs and swallows what they do anyway, so counting never breaks a page.
"""

import logging

from django.dispatch import Signal

log = logging.getLogger(__name__)

preflight_checked = Signal()


def announce(report, source):
    """Send ``preflight_checked`` for ``report``; never raises."""
    for _receiver, result in preflight_checked.send_robust(sender=None, report=report, source=source):
        if isinstance(result, Exception):
            log.error("a preflight_checked receiver failed: %r", result)
