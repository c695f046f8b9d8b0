"""Repository-level pytest plugins: the KVM lab fixtures (`lab`, `lab_guest`) are
available to every test directory."""

pytest_plugins = ["lab.pytest_plugin"]
