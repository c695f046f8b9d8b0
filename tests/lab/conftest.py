"""Lab tests use the `lab` (session) and `lab_guest` (factory) fixtures from
lab/pytest_plugin.py, which the repository's conftest.py registers for every test
directory (`pytest_plugins = ["lab.pytest_plugin"]`).  They are not re-imported here:
a second copy would be a second session fixture holding its own lease on the lab."""
