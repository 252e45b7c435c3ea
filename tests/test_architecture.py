"""The dependency rules of docs/architecture.md, checked on the source (an AST walk, no imports run).

Every `import` counts, at module level or inside a function (a lazy import is still a
dependency; lazy imports are how the old cycles hid). Imports under `if TYPE_CHECKING:` do not.
Module names follow pyproject's package-dir: exporters/ is edgediff.exporters, kernels/ is
edgediff.kernels, fpga/ is edgediff.fpga.
"""

from __future__ import annotations

import ast
from functools import cache, lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"edgediff": ROOT / "edgediff", "edgediff.exporters": ROOT / "exporters",
            "edgediff.kernels": ROOT / "kernels", "edgediff.fpga": ROOT / "fpga"}
BACKENDS = ("edgediff.exporters", "edgediff.kernels", "edgediff.fpga")
STORAGE = ("edgediff.artifact", "edgediff.serialize")
TORCH_LIBS = ("torch", "diffusers", "torch_pruning", "torchvision")

@lru_cache(maxsize=1)
def modules() -> dict[str, Path]:
    """Our module name -> file."""
    out: dict[str, Path] = {}
    for pkg, folder in PACKAGES.items():
        for f in folder.rglob("*.py"):
            rel = f.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if pkg == "edgediff" and parts and parts[0] in ("exporters", "kernels", "fpga"):
                continue  # not a real folder (the mapped packages are scanned from their own roots)
            out[name] = f
    return out


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


@cache
def imports(name: str) -> tuple[tuple[str, tuple[str, ...], int, bool], ...]:
    """(imported module, names taken from it, line, at module level) for every import in `name`'s file."""
    tree = ast.parse(modules()[name].read_text())
    found: list[tuple[str, tuple[str, ...], int, bool]] = []

    def walk(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, (), child.lineno, top) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                found.append((child.module, tuple(a.name for a in child.names), child.lineno, top))
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            walk(child, inner)

    walk(tree, True)
    return tuple(found)


def edges(name: str, module_level_only: bool = False) -> set[str]:
    """Our modules that `name` imports (`from pkg import submodule` counts as importing the submodule)."""
    mods = modules()
    out = set()
    for target, names, _, top in imports(name):
        if module_level_only and not top:
            continue
        subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in mods]
        out.update(subs)
        if target in mods and (len(subs) < len(names) or not names):
            out.add(target)
    out.discard(name)
    return out


def _under(name: str, prefixes: tuple[str, ...] | str) -> bool:
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_scan_sees_the_project() -> None:
    mods = modules()
    for expected in ("edgediff.cli", "edgediff.passes.quant", "edgediff.exporters.onnx", "edgediff.exporters.base",
                     "edgediff.kernels.export", "edgediff.fpga.project", "edgediff.artifact"):
        assert expected in mods
    assert "edgediff.exporters.base" in edges("edgediff.exporters.onnx")
    assert "edgediff.passes" in edges("edgediff.passes.quant")


def test_no_import_cycles() -> None:
    """Tarjan's strongly connected components over every import (lazy ones included)."""
    graph = {m: edges(m) for m in modules()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    assert cycles == [], "import cycles (break them with a registration hook, docs/architecture.md)"


def _violations(rule: callable) -> list[str]:  # type: ignore[valid-type]
    out = []
    for m in sorted(modules()):
        for target, names, line, _ in imports(m):
            why = rule(m, target, names)
            if why:
                out.append(f"{modules()[m].relative_to(ROOT)}:{line}: {m} imports {target} ({why})")
    return out


def test_passes_never_import_backends_the_demo_or_the_cli() -> None:
    def rule(m: str, target: str, names: tuple[str, ...]) -> str | None:
        if _under(m, "edgediff.passes") and _under(target, (*BACKENDS, "edgediff.demo", "edgediff.cli")):
            return "a pass must not depend on a backend, the demo or the CLI"
        return None

    assert not _violations(rule)


def test_backends_never_import_the_cli_or_the_demo() -> None:
    def rule(m: str, target: str, names: tuple[str, ...]) -> str | None:
        if _under(m, BACKENDS) and _under(target, ("edgediff.cli", "edgediff.demo")):
            return "backends are used by the CLI, never the other way"
        return None

    assert not _violations(rule)


def test_no_private_names_across_modules() -> None:
    """`from edgediff.x import _helper` in another module: make it public or keep it where it is."""
    mods = modules()

    def rule(m: str, target: str, names: tuple[str, ...]) -> str | None:
        private = [n for n in names if n.startswith("_") and not n.startswith("__") and f"{target}.{n}" not in mods]
        if _under(target, "edgediff") and target != m and private:
            return f"private name(s) {', '.join(private)}"
        return None

    assert not _violations(rule)


def test_storage_never_imports_passes() -> None:
    def rule(m: str, target: str, names: tuple[str, ...]) -> str | None:
        if m in STORAGE and (_under(target, "edgediff.passes") or (target == "edgediff" and "passes" in names)):
            return "restorers register into the artifact layer instead"
        return None

    assert not _violations(rule)


def test_verify_names_no_pass() -> None:
    def rule(m: str, target: str, names: tuple[str, ...]) -> str | None:
        if m == "edgediff.verify" and target.startswith("edgediff.passes."):
            return "use the registry (edgediff.passes.sampling_correction)"
        return None

    assert not _violations(rule)


def test_runtime_never_imports_torch() -> None:
    """edgediff.runtime runs where torch is not installed: no torch import, directly or through our modules."""
    mods = modules()
    runtime = [m for m in mods if _under(m, "edgediff.runtime")]
    if not runtime:
        pytest.skip("edgediff.runtime does not exist in this tree")

    def pulls_torch(m: str, seen: set[str]) -> str | None:
        # a runtime module: every import counts; a module it imports: what runs on import (module level)
        own = _under(m, "edgediff.runtime")
        for target, _, _, top in imports(m):
            if target.split(".")[0] in TORCH_LIBS and (own or top):
                return f"{m} imports {target}"
        parents = {".".join(m.split(".")[:i]) for i in range(1, m.count(".") + 1)} & set(mods)
        for dep in sorted(edges(m, module_level_only=not own) | parents):  # a module's packages' __init__ run too
            if dep not in seen:
                seen.add(dep)
                why = pulls_torch(dep, seen)
                if why:
                    return f"{m} -> {why}"
        return None

    bad = [why for m in runtime if (why := pulls_torch(m, {m}))]
    assert not bad, bad
