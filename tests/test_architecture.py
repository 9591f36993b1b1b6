"""The floors of DESIGN.md, enforced: the core (``compiler``) imports nothing above it, ``passes`` and
``codegen`` import only the core (never each other), the application (``squeezer``) sits on top of
those three and ``benchmarks`` on top of everything; no two files import each other, directly or
round a longer loop (lazy imports inside functions count: they hide a cycle, they don't remove it);
and the size limits that keep modules readable."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("compiler", "passes", "codegen", "squeezer", "benchmarks")
# what each package may import from the project (itself included)
ALLOWED = {
    "compiler": {"compiler"},
    "passes": {"compiler", "passes"},
    "codegen": {"compiler", "codegen"},
    "squeezer": {"compiler", "passes", "codegen", "squeezer"},
    "benchmarks": set(PACKAGES),
}
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 500, 80
# TVMScript prim-func builders: a kernel is one function by nature (the stated exception)
WHOLE_KERNELS = {"amx_kernels.py", "popcount_kernels.py", "sparse_kernels.py", "cuda_kernels.py",
                 "cuda_conv.py", "cuda_lut.py"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, path: Path, node: ast.ImportFrom | ast.Import) -> list[str]:
    """Project modules an import statement loads (``from pkg import sub`` loads ``pkg.sub``)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            package = module if path.name == "__init__.py" else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{node.module}" if node.module else package
        else:
            base = node.module or ""
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    out = []
    for name in names:
        while name and name not in MODULES:   # `import compiler.errors.X` -> the deepest project module
            name = name.rpartition(".")[0]
        if name:
            out.append(name)
    return out


def _import_graph() -> nx.DiGraph:
    g = nx.DiGraph()
    for module, path in MODULES.items():
        g.add_node(module)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _resolve(module, path, node):
                    if target != module:
                        g.add_edge(module, target, line=node.lineno)
    return g


GRAPH = _import_graph()


def test_packages_import_only_the_floors_below():
    wrong = [f"{MODULES[a].relative_to(ROOT)}:{d['line']} imports {b}"
             for a, b, d in GRAPH.edges(data=True) if b.split(".")[0] not in ALLOWED[a.split(".")[0]]]
    assert not wrong, "imports against the dependency direction:\n" + "\n".join(wrong)


def test_no_import_cycles_between_files():
    cycles = list(nx.simple_cycles(GRAPH))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c + c[:1]) for c in cycles[:10])


def test_the_import_walk_sees_lazy_and_relative_imports():
    """The checks above are only as good as the walk: it must see imports inside functions and
    resolve relative ones (codegen imports compiler.latency lazily to register its provider)."""
    assert GRAPH.has_edge("codegen", "compiler.latency")
    assert GRAPH.has_edge("squeezer.demo", "squeezer.zoo")
    assert GRAPH.has_edge("passes.clustering", "passes.sparsity")


@pytest.mark.parametrize("pkg", ["compiler", "passes", "codegen"])
def test_modules_and_functions_stay_small(pkg):
    too_big = []
    for path in sorted((ROOT / pkg).rglob("*.py")):
        source = path.read_text()
        lines = source.count("\n")
        if lines > MAX_MODULE_LINES:
            too_big.append(f"{path.relative_to(ROOT)}: {lines} lines")
        if path.name in WHOLE_KERNELS:
            continue
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_big.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert not too_big, f"over {MAX_MODULE_LINES} lines a module / {MAX_FUNCTION_LINES} a function:\n" + "\n".join(too_big)


def test_the_core_finds_the_pass_families_through_their_entry_point():
    """``compiler.parse_pass_spec`` works without the caller importing ``passes``: the registry
    loads the ``squeezer.passes`` entry-point group (the core never names the package)."""
    import subprocess
    import sys

    code = ("import sys, compiler; assert 'passes' not in sys.modules; "
            "p = compiler.parse_pass_spec('sparsify:sparsity=0.5'); print(type(p).__module__, p.spec())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["passes.sparsity", "sparsify:sparsity=0.5"]
