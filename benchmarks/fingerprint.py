"""Fingerprints of what the compiler emits, for checking that a refactor changed no behaviour:
``python -m benchmarks.fingerprint > a.txt`` in two checkouts, then ``diff a.txt b.txt``.

Each line is one case (a zoo model, alone or after a pass pipeline): a hash of the LLVM IR of
every kernel (pointer addresses that LLVM writes into its alias metadata masked) and a hash of the
output bytes on the zoo's example input. Equal IR means equal speed: no benchmark can move by more
than noise. Timing is not involved, so the check is exact on a busy machine."""

from __future__ import annotations

import hashlib
import re
import sys
import warnings

CASES: list[tuple[str, tuple[str, ...]]] = [
    ("lenet5", ("channel-pruning:target_macs=0.5",)),
    ("mlp", ("sparsify:sparsity=0.8",)),
    ("mlp", ("sparsify:sparsity=0.8", "cluster:bits=4")),
    ("mlp", ("cluster:bits=4",)),
    ("lenet5", ("binarize:method=xnor",)),
    ("residual", ("low-rank:energy=0.8",)),
]


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def fingerprint(name: str, specs: tuple[str, ...]) -> str:
    import torch

    import codegen
    import compiler
    from squeezer import zoo

    entry = zoo.get(name)
    torch.manual_seed(0)
    model, x = entry.build(), entry.example_inputs(batch=1)
    graph = compiler.Pipeline([compiler.parse_pass_spec(s) for s in specs])(compiler.trace(model, x))
    compiled = codegen.build(graph, "llvm", sparse_kernels="sparse")   # no timed choice: deterministic
    ir = re.sub(r"^; ModuleID.*$", "", compiled.kernel_source(), flags=re.M)
    ir = re.sub(r"0x[0-9a-f]{6,}", "0xADDR", ir)
    out = compiled(*x)
    out = out[0] if isinstance(out, tuple) else out
    return f"{name} {'+'.join(specs) or '-'} ir={_digest(ir.encode())} out={_digest(out.tobytes())}"


def main() -> int:
    warnings.filterwarnings("ignore")
    from squeezer import zoo

    for name, specs in [(n, ()) for n in zoo.ZOO] + CASES:
        print(fingerprint(name, specs), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
