"""The preflight registry: each check declares its id, title and place once."""

import pytest

from migrations_app.preflight import checks, title
from migrations_app.preflight.registry import check

DISPLAY_ORDER = [
    "connection",
    "versions",
    "same_host",
    "vm_state",
    "plan",
    "jobs",
    "cpu",
    "machine",
    "vcpus",
    "memory",
    "networks",
    "storage",
    "collision",
    "snapshots",
    "devices",
    "firmware",
    "disk_cache",
    "prediction",
    "transport",
    "migration_ports",
    "guest_shutdown",
]


def test_it_lists_every_check_once_in_display_order():
    assert [spec.id for spec in checks()] == DISPLAY_ORDER
    assert title("memory") == "Free memory on the target"
    assert all(spec.fn.__name__ == f"check_{spec.id}" for spec in checks())


def test_it_refuses_a_second_check_with_the_same_id():
    with pytest.raises(ValueError, match="registered twice"):

        @check("memory", "Another memory check", order=999)
        def check_memory_again(ctx):  # pragma: no cover - never registered
            raise AssertionError
