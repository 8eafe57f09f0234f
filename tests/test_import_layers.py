"""Imports point one way along the data flow (contracts in .importlinter) and form no cycle.

The check is import-linter's own (`lint-imports`, also run by `make lint`); the second test
proves it catches an import against the flow, so a passing run means something.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("exchange_listener", "workers", "emulators")
LINT_IMPORTS = str(Path(sys.executable).parent / "lint-imports")


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LINT_IMPORTS, "--no-cache"], check=False, cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"})


def test_every_import_follows_the_flow():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(("module", "added", "contract"), [
    ("exchange_listener/core/config.py", "workers.jobs", "layers along the flow"),
    ("workers/policy.py", "exchange_listener.listener.leases", "workers never import the listener"),
    ("exchange_listener/commands/status.py", "emulators.services", "the runtime never imports emulators"),
    ("emulators/services.py", "exchange_listener.cli", "emulators use only core"),
])
def test_an_import_against_a_contract_is_caught(tmp_path, module, added, contract):
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("schema", "__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path)
    path = tmp_path / module
    path.write_text(path.read_text() + f"\nimport {added}  # breaks: {contract}\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0, contract
    importer = module.removesuffix(".py").replace("/", ".")
    assert f"{importer} -> {added}" in result.stdout, result.stdout


def _cycle(graph: grimp.ImportGraph) -> list[str] | None:
    """One import cycle among the modules (function-level imports included), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if state.get(imported) == 1:
                return path[path.index(imported):] + [imported]
            if imported not in state and (found := visit(imported)):
                return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph.modules):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_no_import_cycles():
    sys.path.insert(0, str(ROOT))
    try:
        graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    finally:
        sys.path.remove(str(ROOT))
    assert len(graph.modules) > 40  # the whole tree was read
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
