"""Check hpvit's import graph: the chain runs one way, no import circles, imports at module level.

Run from the repository root (no installation needed, nothing is imported; it reads the source)::

    python tools/check_layers.py            # summary + every violation; exit 1 if there is one
    python tools/check_layers.py --graph    # also print every module's hpvit imports

The chain (docs/architecture.md), left to right; a module may import modules of its own step or of a
step to its right, never one to its left, and never the package root ``hpvit``::

    cli -> tasks -> engine | evaluation | export | verify | analysis | bench -> models
        -> checkpoints | data -> config -> layers -> errors | utils | lazy

Counted separately (reported, not failures): imports made inside functions. Allowed there: optional
peers (pycocotools, transformers, open_clip, onnx, onnxruntime, onnxscript, torch.utils.tensorboard) and
everything in ``cli/`` (the command line parses its arguments before it imports torch, so ``--help`` answers at once).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "hpvit"

# step of the chain for each top-level part of the package (smaller = further left)
STEPS: dict[str, int] = {
    "__init__": 0, "__main__": 0,
    "cli": 1,
    "tasks": 2,
    "engine": 3, "evaluation": 3, "export": 3, "verify": 3, "analysis": 3, "bench": 3,
    "models": 4,
    "checkpoints": 5, "data": 5,
    "config": 6,
    "layers": 7,
    "errors": 8, "utils": 8, "lazy": 8, "dictio": 8,
}
OPTIONAL_PEERS = {"pycocotools", "transformers", "open_clip", "onnx", "onnxruntime", "onnxscript"}
OPTIONAL_MODULES = {"torch.utils.tensorboard"}  # optional peers inside a required package (it imports tensorboard)


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def part_of(mod: str) -> str:
    """'hpvit.models.hierarchical' -> 'models'; 'hpvit' -> '__init__'."""
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _resolve(node: ast.ImportFrom, mod: str, is_pkg: bool) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([node.module] if node.module else []))
    # "from . import x" / "from .models import registry": x may be a submodule
    return [f"{base}.{a.name}" for a in node.names] + [base]


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def scan(path: Path, known: set[str]) -> list[tuple[str, bool, bool, int]]:
    """Imports of one file: (imported module, at module level, type-checking only, line)."""
    mod = module_name(path)
    is_pkg = path.name == "__init__.py"
    out: list[tuple[str, bool, bool, int]] = []

    def visit(node: ast.AST, top: bool, typing_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False, typing_only)
            elif isinstance(child, ast.If) and _type_checking(child):
                visit(child, top, True)
            elif isinstance(child, ast.Import):
                out.extend((a.name, top, typing_only, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                names = _resolve(child, mod, is_pkg)
                hp = [n for n in names if n in known]
                target = hp[0] if hp else names[-1]
                if hp and child.level == 0 and child.module == "hpvit":
                    target = "hpvit"
                out.append((target, top, typing_only, child.lineno))
            else:
                visit(child, top, typing_only)

    visit(ast.parse(path.read_text(), str(path)), True, False)
    return out


def analyse() -> dict:
    files = sorted(ROOT.rglob("*.py"))
    known = {module_name(f) for f in files}
    edges: dict[str, set[str]] = {m: set() for m in known}
    violations: list[str] = []
    deferred_hpvit: list[str] = []
    deferred_other: list[str] = []
    for f in files:
        mod = module_name(f)
        rel = f.relative_to(ROOT.parents[1])
        src_part = part_of(mod)
        for target, top, typing_only, line in scan(f, known):
            root = target.split(".")[0]
            if root == "hpvit":
                if target == "hpvit" and mod != "hpvit":
                    violations.append(f"{rel}:{line}: imports the package root 'hpvit' (import the defining module)")
                    continue
                dst_part = part_of(target)
                if src_part not in STEPS or dst_part not in STEPS:
                    violations.append(f"{rel}:{line}: {mod} -> {target}: part not in the chain (add it to STEPS)")
                elif STEPS[dst_part] < STEPS[src_part]:
                    violations.append(f"{rel}:{line}: {mod} ({src_part}) imports {target} ({dst_part}), "
                                      "a step to its left in the chain")
                if not typing_only:  # a deferred import closes a circle at run time just the same
                    edges[mod].add(target)
                if not top and src_part != "cli" and mod != "hpvit":
                    deferred_hpvit.append(f"{rel}:{line}: {target}")
            elif not top and root not in OPTIONAL_PEERS and target not in OPTIONAL_MODULES and src_part != "cli":
                deferred_other.append(f"{rel}:{line}: {target}")
    cycles = _cycles(edges)
    return {"modules": len(known), "edges": edges, "violations": violations, "cycles": cycles,
            "deferred_hpvit": deferred_hpvit, "deferred_other": deferred_other}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), i.e. import circles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10000)

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                strong(w)
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
                out.append(sorted(comp))
    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graph", action="store_true", help="print every module's module-level hpvit imports")
    ap.add_argument("--deferred", action="store_true", help="list every import made inside a function")
    args = ap.parse_args(argv)
    r = analyse()
    if args.graph:
        for m in sorted(r["edges"]):
            print(f"{m}: {', '.join(sorted(r['edges'][m])) or '-'}")
    print(f"modules: {r['modules']}")
    print(f"import circles: {len(r['cycles'])}")
    for c in r["cycles"]:
        print("  circle: " + " <-> ".join(c))
    print(f"imports against the chain (or of the package root): {len(r['violations'])}")
    for v in r["violations"]:
        print("  " + v)
    print(f"imports inside functions outside cli/ (hpvit modules): {len(r['deferred_hpvit'])}")
    print(f"imports inside functions outside cli/ (other, not optional peers): {len(r['deferred_other'])}")
    if args.deferred:
        for d in r["deferred_hpvit"] + r["deferred_other"]:
            print("  " + d)
    return 1 if r["cycles"] or r["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
