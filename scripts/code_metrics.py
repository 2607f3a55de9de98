#!/usr/bin/env python
"""Structure metrics of the code base: longest functions, long modules, upward imports, import cycles.

    python scripts/code_metrics.py                 # table on stdout
    python scripts/code_metrics.py --json out.json # and the numbers as JSON

Layers, lowest first (a module may import its own layer and the ones below it):

    0 envs/                        the MuJoCo suite; stands alone
    1 vla_ft.constants, errors, integrity, io
    2 vla_ft.config, provenance    the typed config package (schema, loader); commit, versions, machine
    3 vla_ft.data, models, losses, sim (robosuite: an env with experts, for collection and eval)
    4 vla_ft.eval                  simulation evaluation; also vla_ft.sim.env_types (the env-type
                                   registry: builds gym ids through vla_ft.eval) and vla_ft.data.collect
                                   (collection asks that registry)
    5 vla_ft.train, config_checks  the loop, checkpoints, optimizers; config rules that need the models
    6 vla_ft.recipes / finetune, compare, bench_quality, tools, cli: orchestration

An import from a lower layer to a higher one is an "upward import". Imports inside functions count
too (they are how a cycle is usually hidden). A cycle is a strongly connected group of modules.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("vla_ft", "envs")
LONG_MODULE = 400

# module-name prefix -> layer; the longest matching prefix wins
LAYERS = {
    "envs": 0,
    "vla_ft": 1,
    "vla_ft.config": 2,  # the package: schema, loader, convert
    "vla_ft.config_docs": 6,
    "vla_ft.config_checks": 5,
    "vla_ft.provenance": 2,
    "vla_ft.data": 3,
    "vla_ft.data.collect": 4,
    "vla_ft.models": 3,
    "vla_ft.losses": 3,
    "vla_ft.sim": 3,
    "vla_ft.sim.env_types": 4,
    "vla_ft.task_terms": 3,
    "vla_ft.eval": 4,
    "vla_ft.train": 5,
    "vla_ft.train.finetune": 6,
    "vla_ft.recipes": 6,
    "vla_ft.compare": 6,
    "vla_ft.bench_quality": 6,
    "vla_ft.tools": 6,
    "vla_ft.cli": 6,
}


def layer(module: str) -> int:
    best, depth = 1, -1
    for prefix, value in LAYERS.items():
        if (module == prefix or module.startswith(prefix + ".")) and prefix.count(".") > depth:
            best, depth = value, prefix.count(".")
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def resolve(importer: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def collect() -> tuple[dict[str, Path], dict[str, set[str]]]:
    files = {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = resolve(mod, path.name == "__init__.py", node)
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                # the deepest module of ours the name lives in ("vla_ft.eval.report.git_commit" -> report)
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    # "from vla_ft.eval import x" names the package; x's own module is listed separately
    return files, graph


def functions(files: dict[str, Path]) -> list[tuple[int, str]]:
    out = []
    for mod, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((node.end_lineno - node.lineno + 1, f"{mod}.{node.name}:{node.lineno}"))
    return sorted(out, reverse=True)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(10000)

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
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="also write the numbers here")
    p.add_argument("--top", type=int, default=10)
    args = p.parse_args()
    files, graph = collect()
    # a package __init__ re-exporting its modules is not an edge the other way
    pkg_edges = {(m, t) for m, ts in graph.items() for t in ts if t.startswith(m + ".")}
    for m, t in pkg_edges:
        graph[m].discard(t)
    sizes = sorted(((len(p.read_text().splitlines()), m) for m, p in files.items()), reverse=True)
    long_modules = [(n, m) for n, m in sizes if n > LONG_MODULE]
    fns = functions(files)
    upward = sorted((m, t) for m, ts in graph.items() for t in ts if layer(t) > layer(m))
    cyc = cycles(graph)
    print(f"modules: {len(files)}; over {LONG_MODULE} lines: {len(long_modules)}")
    for n, m in long_modules:
        print(f"  {n:5d}  {m}")
    print(f"longest functions (top {args.top}):")
    for n, name in fns[: args.top]:
        print(f"  {n:5d}  {name}")
    print(f"upward imports: {len(upward)}")
    for m, t in upward:
        print(f"  {m} (layer {layer(m)}) -> {t} (layer {layer(t)})")
    print(f"import cycles: {len(cyc)}")
    for c in cyc:
        print("  " + " <-> ".join(c))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {
                    "modules": len(files),
                    "long_modules": [{"lines": n, "module": m} for n, m in long_modules],
                    "longest_functions": [{"lines": n, "function": f} for n, f in fns[: args.top]],
                    "upward_imports": [{"from": m, "to": t} for m, t in upward],
                    "cycles": cyc,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
