"""Which VMs have a migration job under way, asked by hosts code (inventory sync, power
actions, the lists) without importing the migrations app, which sits a layer above.

The migrations app registers its query when it loads (MigrationsAppConfig.ready), so
this module only holds the hook. ``active_jobs()`` is a queryset of job rows with at least
``pk`` and ``vm_id`` (and ``vm__host`` for filtering).
"""

_provider = None


def register(provider):
    """``provider(waiting)`` returns the queryset of jobs under way; with ``waiting`` False,
    requests still waiting for approval are left out (they do not hold a VM yet)."""
    global _provider
    _provider = provider


def active_jobs(*, waiting=True):
    if _provider is None:
        raise RuntimeError("no migration job provider registered (is migrations_app installed?)")
    return _provider(waiting)
