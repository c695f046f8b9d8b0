"""Lab fixtures (real libvirtd hosts on this machine); see lab/pytest_plugin.py."""

from lab.pytest_plugin import lab, lab_guest  # noqa: F401  (pytest fixtures)
