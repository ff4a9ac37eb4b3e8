"""Imports run downward between layers: a module imports from its own layer or below, never above.

Every import counts, including those inside functions and under ``if TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "appliance"

# bottom (0) to top (4); an entry for a package covers every module under it
LAYERS = {
    # 0: definitions and one DICOM file at a time; nothing here knows the store
    "appliance": 0,  # the package itself: only __version__
    "appliance.errors": 0,
    "appliance.config": 0,
    "appliance.tomlfile": 0,  # reading and writing the small TOML files
    "appliance.durable": 0,  # temporary name, fsync, rename, fsync the folder
    "appliance.dicomfile": 0,
    "appliance.metrics": 0,  # sensitivity, specificity, AUC: pure functions used by inference and evaluate
    "appliance.signing": 0,  # Ed25519 signatures over a folder (bundles, model packs)
    # 1: the data directory and its database
    "appliance.store": 1,
    # 2: ways in, series assembly, model packs and backends, the phantom generator
    "appliance.ingest": 2,
    "appliance.series": 2,
    "appliance.inference": 2,
    "appliance.synth": 2,
    # 3: analysis on volumes, jobs, outputs and the monthly export
    "appliance.pipelines": 3,
    "appliance.pipelines.lung_segmentation": 3,  # learned lung mask with the classical one as fallback
    "appliance.analysis": 3,
    "appliance.backup": 3,  # backup and restore of the data directory (database, keys, settings, artefacts)
    "appliance.calibration": 3,
    "appliance.jobs": 3,
    "appliance.outputs": 3,
    "appliance.export": 3,
    "appliance.evaluate": 3,
    "appliance.hub": 3,
    "appliance.batch": 3,  # screening an archive: local worker processes or a Ray cluster
    # 4: what a person or systemd starts
    "appliance.web": 4,
    "appliance.cli": 4,
    "appliance.serve": 4,
    "appliance.systemd_units": 4,  # unit files for the processes the CLI starts
    "appliance.doctor": 4,  # `appliance doctor`: every check a technician reads over the phone
    "appliance.release": 4,  # update and rollback of versions installed from signed bundles
    "appliance.https": 4,  # site certificate, nginx config and unit of the HTTPS proxy
}

@dataclasses.dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    path: Path
    line: int

    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int | None:
    """The layer of ``module``: its own entry, else its closest package's (the root package aside)."""
    name = module
    while name:
        if name in LAYERS and (name != "appliance" or module == "appliance"):
            return LAYERS[name]
        name = name.rpartition(".")[0]
    return None


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _targets(node: ast.Import | ast.ImportFrom, module: str, path: Path) -> list[str]:
    """The modules an import statement loads (``from pkg import mod`` names ``pkg.mod``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = _package_of(module, path).split(".")
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]


def package_imports() -> list[Import]:
    """Every import of a module of this package, by every module of it."""
    found = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(node, module, path):
                    if target == "appliance" or target.startswith("appliance."):
                        found.append(Import(module, target, path, node.lineno))
    return list(dict.fromkeys(found))  # ``from pkg import a, b`` of one module counts once


def upward_imports() -> list[Import]:
    return [i for i in package_imports() if (layer_of(i.imported) or 0) > (layer_of(i.importer) or 0)]


def test_every_module_has_a_layer():
    missing = [m for m in MODULES if layer_of(m) is None]
    assert not missing, (f"no layer for {', '.join(missing)}: add the module (or its package) to LAYERS "
                         "in tests/test_layers.py")


def test_no_module_imports_from_a_layer_above_its_own():
    wrong = [f"{i.where()}: {i.importer} (layer {layer_of(i.importer)}) imports {i.imported} "
             f"(layer {layer_of(i.imported)})"
             for i in upward_imports()]
    assert not wrong, "imports from a higher layer:\n" + "\n".join(wrong)


def test_blueprints_do_not_import_the_app_package():
    # appliance/web/__init__.py registers the blueprints; a blueprint importing it back makes a cycle
    wrong = [f"{i.where()}: {i.importer} imports appliance.web" for i in package_imports()
             if i.importer.startswith("appliance.web.") and i.imported == "appliance.web"]
    assert not wrong, "\n".join(wrong) + "\n(take get_db from appliance.web.db, settings_of from appliance.web.context)"


def test_pipelines_never_import_the_phantom_generator():
    # pipelines run on patients; phantoms are for calibration (appliance.calibration) and tests
    wrong = [f"{i.where()}: {i.importer} imports {i.imported}" for i in package_imports()
             if i.importer.startswith("appliance.pipelines") and i.imported.startswith("appliance.synth")]
    assert not wrong, "\n".join(wrong)


def test_no_module_is_imported_by_a_computed_name():
    # a module named in a string (importlib, __import__) is invisible to this test, mypy and grep
    wrong = []
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                computed = any(a.name.split(".")[0] == "importlib" for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                computed = (node.module or "").split(".")[0] == "importlib"
            else:
                computed = isinstance(node, ast.Name) and node.id == "__import__"
            if computed:
                wrong.append(f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}")
    assert not wrong, "modules imported by a computed name:\n" + "\n".join(wrong)


def test_the_checker_sees_imports_inside_functions_and_type_checking_blocks(tmp_path):
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from appliance.web import db\n"
              "def f():\n    import appliance.cli\n    from . import files\n")
    tree = ast.parse(source)
    path = PACKAGE / "store" / "example.py"
    targets = [t for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
               for t in _targets(n, "appliance.store.example", path)]
    assert {"appliance.web.db", "appliance.cli", "appliance.store.files"} <= set(targets)
    assert layer_of("appliance.store.example") == 1 and layer_of("appliance.cli") == 4
    assert layer_of("appliance.newthing") is None
