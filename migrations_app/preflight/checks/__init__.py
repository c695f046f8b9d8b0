"""The checks, one file per theme. Importing this package registers them all (the
registry orders them by their declared ``order``, not by file)."""

from migrations_app.preflight.checks import (  # noqa: F401
    capacity,
    cpu,
    devices,
    identity,
    network,
    policy,
    prediction,
    storage,
)
