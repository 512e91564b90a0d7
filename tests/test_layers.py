"""The README's Design section is true of the imports: each engine module imports only the
modules below it in the layer chain (typing-only imports aside), and the shipped package
holds no test harness."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "daxfs"

# the chain as README.md draws it, top to bottom; modules on one line share a layer
CHAIN = [["fuse_ops", "dataplane"], ["fs"], ["namespace", "filedata", "xattrs", "orphans", "cowlog"], ["sharing", "dedupe"], ["bufcache"], ["frames"],
         ["inodes", "dirs"], ["extents"], ["alloc"], ["txn"], ["journal"], ["pmem"], ["format"]]
ANYWHERE_BELOW = {"errors", "usage", "format"}      # leaf helpers any layer may use


def runtime_imports(path: Path) -> set[str]:
    """Sibling modules `path` imports at run time (not under `if TYPE_CHECKING:`)."""
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
    return out


def test_engine_imports_follow_the_layer_chain():
    rank = {m: i for i, layer in enumerate(CHAIN) for m in layer}
    wrong = []
    for mod, r in rank.items():
        for dep in runtime_imports(PKG / f"{mod}.py"):
            if dep in ANYWHERE_BELOW and dep != mod:
                continue
            if dep not in rank or rank[dep] <= r:
                wrong.append(f"{mod} imports {dep}")
    assert not wrong, wrong


def test_layer_chain_names_every_engine_module():
    named = {m for layer in CHAIN for m in layer} | ANYWHERE_BELOW
    around = {"__init__", "mkfs", "fusehook", "progress"}
    modules = {p.stem for p in PKG.glob("*.py")}
    assert modules - named - around == set()


def test_package_ships_no_harness_and_no_module_over_500_lines():
    for p in PKG.rglob("*.py"):
        text = p.read_text()
        assert "harness" not in p.stem and "crashsim" not in p.stem, p
        assert text.count("\n") <= 520, f"{p} has {text.count(chr(10))} lines"
