"""The package's layout is its architecture: each folder may import only the folders its rule names (an AST
check of every module), nothing imports the callback, and module-level imports form no cycle."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "open_instruct_ckpt"
LEAVES = {"_errors", "_logging"}  # stdlib-only leaves any module may import
RULES = {  # folder -> the package's folders and modules it may import (besides itself and LEAVES)
    "_format": set(),
    "_measure": {"_format"},
    "_upload": {"_format"},
    "_hooks": {"_format"},
    "_engines": {"_dist"},
    "_when": {"_dist", "_measure", "_format"},
    "_write": {"_engines", "_format", "_measure", "_dist"},
    "_dist": set(),
}
THIRD_PARTY_AT_IMPORT = {  # folder -> third-party packages it may import at module level (others only lazily)
    "_format": set(),
    "_measure": set(),
    "_upload": set(),
    "_hooks": set(),
    "_engines": {"torch"},
    "_when": {"torch", "transformers"},
    "_write": {"torch", "transformers", "huggingface_hub", "safetensors"},
    "_dist": {"torch"},
}


def modules() -> dict[str, Path]:
    """Dotted name under the package (e.g. `_write.saver`, `callback`) -> file."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path) -> list[tuple[str, bool]]:
    """(absolute module, at module level?) for every import in a module; package modules as dotted names without
    the package prefix, third-party ones as given."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body} | {id(n) for node in tree.body if isinstance(node, ast.If) for n in node.body}
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".") if name else []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(_strip(alias.name), id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            for alias in node.names:
                target = ".".join(base)
                found.append((f"{target}.{alias.name}".strip(".") if not node.module else target, id(node) in top))
        elif isinstance(node, ast.ImportFrom):
            found.append((_strip(node.module or ""), id(node) in top))
    return found


def _strip(module: str) -> str:
    return module[len("open_instruct_ckpt."):] if module.startswith("open_instruct_ckpt.") else module


def folder(name: str) -> str:
    return name.split(".")[0]


INTERNAL = {folder(name) for name in modules()} - {""}


@pytest.mark.parametrize("name", sorted(n for n in modules() if folder(n) in RULES))
def test_each_folder_imports_only_what_its_rule_allows(name):
    path, own = modules()[name], folder(name)
    for target, top_level in imports(name, path):
        head = folder(target)
        if head in INTERNAL:
            assert head == own or head in RULES[own] | LEAVES, f"{name} imports {target}"
        elif top_level and head not in sys.stdlib_module_names and head != "__future__":
            assert head in THIRD_PARTY_AT_IMPORT.get(own, set()), f"{name} imports {target} when it is imported"


def test_deepspeed_only_in_the_zero3_engine_and_lazily_and_nothing_imports_the_callback():
    for name, path in modules().items():
        for target, top_level in imports(name, path):
            if target.split(".")[0] == "deepspeed":
                assert name == "_engines.zero3" and not top_level, (name, target)
            if name not in ("", "callback"):
                assert folder(target) != "callback", f"{name} imports the callback"


def test_upload_never_imports_torch():
    for name, path in modules().items():
        if folder(name) == "_upload":
            assert not [t for t, _ in imports(name, path) if t.split(".")[0] == "torch"], name


def test_module_level_imports_form_no_cycle():
    graph = {name: {t for t, top in imports(name, path) if top and folder(t) in INTERNAL | {""}}
             for name, path in modules().items()}
    graph = {name: {t if t in graph else t.rsplit(".", 1)[0] for t in targets} for name, targets in graph.items()}
    visiting, done = set(), set()

    def visit(node: str, trail: list[str]) -> None:
        if node in done or node not in graph:
            return
        assert node not in visiting, f"import cycle: {' -> '.join(trail + [node])}"
        visiting.add(node)
        for nxt in sorted(graph[node]):
            if nxt != node:
                visit(nxt, trail + [node])
        visiting.discard(node)
        done.add(node)

    for name in sorted(graph):
        visit(name, [])


def test_modules_are_small():
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert not {name: n for name, n in sizes.items() if n > 300}, sizes
