"""The package's layout rules: layers import downward only, Lightning only at the top, no private names
across modules, and every name the README shows imports."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_tiercache"

#: Layer of each top-level part; a module may import its own part and parts of a lower rank only.
RANK = {"errors": 0, "config": 0, "store": 1, "activations": 2, "kv": 2, "oom": 2, "lightning": 3}
#: Upward imports that are allowed, with why.
ALLOWED_UP = {
    # TierConfig validates its policy name against the registry, so a bad name fails at construction.
    ("config", "lightning_tiercache.store.policy"),
}
LIGHTNING_PACKAGES = {"lightning", "pytorch_lightning", "lightning_fabric"}


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """Every import in ``path`` (also those inside functions), as (module, imported names)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
    return out


def _part(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def test_only_the_lightning_layer_and_the_top_import_lightning():
    offenders = [
        f"{p.relative_to(ROOT)} imports {m}"
        for p in _modules()
        if _part(p) in RANK and _part(p) != "lightning"
        for m, _ in _imports(p)
        if m.split(".")[0] in LIGHTNING_PACKAGES
    ]
    assert offenders == []


def test_layers_import_downward_only():
    offenders = []
    for p in _modules():
        part = _part(p)
        if part not in RANK:
            continue
        for m, _ in _imports(p):
            if not m.startswith("lightning_tiercache."):
                continue
            target = m.split(".")[1]
            if target in RANK and target != part and RANK[target] >= RANK[part] and (part, m) not in ALLOWED_UP:
                offenders.append(f"{p.relative_to(ROOT)} imports {m}")
    assert offenders == []


def test_no_private_name_is_imported_across_modules():
    offenders = [
        f"{p.relative_to(ROOT)} imports {name} from {m}"
        for p in _modules()
        for m, names in _imports(p)
        if m.startswith("lightning_tiercache")
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert offenders == []


def test_every_module_says_what_it_owns():
    missing = [str(p.relative_to(ROOT)) for p in _modules() if ast.get_docstring(ast.parse(p.read_text())) is None]
    assert missing == []


def _readme_imports() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    pairs = []
    for module, names in re.findall(r"^from (lightning_tiercache[\w.]*) import ([\w, ]+)$", text, re.M):
        pairs += [(module, n.strip()) for n in names.split(",")]
    for dotted in re.findall(r"`(lightning_tiercache(?:\.\w+)+)`", text):
        module, _, name = dotted.rpartition(".")
        pairs.append((module, name))
    return pairs


def test_the_readme_names_something_to_import():
    assert len(_readme_imports()) >= 10


@pytest.mark.parametrize(("module", "name"), _readme_imports(), ids=lambda v: v)
def test_every_name_the_readme_shows_imports(module: str, name: str):
    mod = importlib.import_module(module)
    if not hasattr(mod, name):  # `lightning_tiercache.kv` style: a module named in full
        importlib.import_module(f"{module}.{name}")


def test_every_public_facade_name_resolves():
    import lightning_tiercache

    names = list(lightning_tiercache.__all__) + list(lightning_tiercache._LAZY)
    for name in names:
        assert getattr(lightning_tiercache, name) is not None, name


@pytest.mark.parametrize("entry", ["bench", "report", "dashboard"])
def test_command_line_entry_points_run(entry: str):
    out = subprocess.run(
        [sys.executable, "-m", f"lightning_tiercache.{entry}", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage" in out.stdout.lower()
