"""Imports point one way: down the layers listed in docs/architecture.md.

Every module of the apps is parsed (ast, not imported) and each of its imports of another
kvmweb module, at the top or inside a function, must go to its own layer or a lower one.
A module the table does not place fails too, so a new package is placed on purpose.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("kvmweb", "hosts", "migrations_app", "fleet", "api", "notifications")

# Lowest first. A module belongs to the longest prefix that matches its dotted name.
LAYERS = [
    (
        "core",  # settings, access, roles and scope, accounts, audit records: import no app
        [
            "kvmweb",  # the package itself: kvmweb/__init__.py
            "kvmweb.env",
            "kvmweb.settings",
            "kvmweb.access",
            "kvmweb.limits",
            "kvmweb.security",
            "kvmweb.workers",
            "kvmweb.serve",
            "kvmweb.accounts",
            "kvmweb.audit",
        ],
    ),
    ("hosts", ["hosts"]),
    ("migrations", ["migrations_app"]),
    ("fleet", ["fleet"]),
    ("edges", ["api", "notifications"]),
    (
        "site",  # wiring and pages that read every app
        [
            "kvmweb.urls",
            "kvmweb.asgi",
            "kvmweb.routing",
            "kvmweb.views",
            "kvmweb.health",
            "kvmweb.context_processors",
            "kvmweb.audit.views",
            "kvmweb.audit.urls",
            "kvmweb.audit.objects",
        ],
    ),
]
# Entry points (manage.py commands) and Django's migration files may import anything.
TOP = len(LAYERS)


def layer_of(module):
    if ".management.commands." in module or ".migrations." in module:
        return TOP
    best = None
    for rank, (_name, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > len(best[1]):
                    best = (rank, prefix)
    return None if best is None else best[0]


def module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path):
    """(line, imported module) for every import of a kvmweb module in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ""
    if ROOT in path.parents:
        package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                names = [node.module]
            # "from kvmweb import health" imports the module kvmweb.health
            names = [f"{names[0]}.{alias.name}" for alias in node.names] + names
        else:
            continue
        for name in names:
            if name and name.split(".")[0] in PACKAGES:
                yield node.lineno, name


def target_layer(name):
    """The layer of an imported name: the longest module path that is a kvmweb module."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        path = ROOT.joinpath(*parts[:end])
        if path.with_suffix(".py").exists() or (path / "__init__.py").exists():
            return layer_of(candidate)
    return None


def modules():
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def test_it_places_every_module_in_a_layer():
    unplaced = [module_name(p) for p in modules() if layer_of(module_name(p)) is None]
    assert unplaced == []


def test_it_finds_no_import_that_points_up():
    upward = []
    for path in modules():
        here = layer_of(module_name(path))
        for line, name in imports(path):
            there = target_layer(name)
            if there is not None and here is not None and there > here:
                upward.append(
                    f"{path.relative_to(ROOT)}:{line} imports {name} "
                    f"({LAYERS[there][0]} is above {LAYERS[here][0]})"
                )
    assert sorted(set(upward)) == []


def test_it_catches_an_upward_import(tmp_path):
    """The check itself: a hosts module importing the migrations app is reported."""
    assert layer_of("hosts.services") < target_layer("migrations_app.models")
    assert target_layer("kvmweb.accounts.roles") == 0
    assert layer_of("kvmweb.audit.views") == TOP - 1
    assert layer_of("hosts.management.commands.ensure_schedules") == TOP
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from migrations_app.models import MigrationJob\n")
    found = [name for _line, name in imports(source)]
    assert "migrations_app.models" in found
