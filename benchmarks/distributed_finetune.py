"""The demo's recovery fine-tune as a torchrun worker (or one plain process): channel pruning of the
cached LeNet-5 to half its MACs, then the demo's 3 epochs of distillation at global batch 64. Rank 0
prints one JSON line: the fine-tune's wall time, the test accuracy after it, and the world size."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace

import torch
from torch.utils.data import TensorDataset


def main() -> None:
    from compiler.distributed import barrier, init_from_env
    from compiler.finetune import batches_of, evaluate, train
    from compiler.tracing import trace
    from squeezer.data import mnist_subset
    from squeezer.demo import BASELINE, DEFAULT_PASSES, FINETUNE, shared_baseline_model

    w = init_from_env()
    model = shared_baseline_model(progress=False, log=lambda *_: None)
    (xtr, ytr), (xte, yte) = mnist_subset()
    student = DEFAULT_PASSES[0](trace(model, (xte[:1],))).module
    config = replace(FINETUNE, progress=False, batch_size=BASELINE["batch"], data_seed=1)
    barrier()
    start = time.perf_counter()
    history = train(student, TensorDataset(xtr, ytr), config, teacher=model)
    barrier()
    seconds = time.perf_counter() - start
    if w.is_main:
        print(json.dumps({"seconds": seconds, "steps": len(history.losses), "processes": w.size,
                          "threads": torch.get_num_threads(),
                          "accuracy": evaluate(student, batches_of(xte, yte, 250))}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
