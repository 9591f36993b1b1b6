"""Rows of the survey-methods suite (survey_methods.py): binary and low-bit methods (issue 23: Network Sketching, Local Binary CNN, ADMM, Tang et al., Bi-Real Net, TBN, Two-Step Quantization).

The training methods follow the demo's binarized recipe: STE layers fine-tuned with distillation from
the fp32 LeNet-5 (10 epochs, 2 in quick mode), then packed into bit-planes; first and last layer fp32."""

from __future__ import annotations

from typing import Any

from .survey_common import Context, Method


def _binary(method: str, note: str, **options):
    def make(ctx: Context) -> tuple[Any, str]:
        from compiler.finetune import TrainConfig, batches_of, train
        from passes import Binarize, tang_config

        epochs = 2 if ctx.quick else 10
        config = tang_config(epochs=epochs, lr=2e-3, progress=False) if method == "tang" else \
            TrainConfig(epochs=epochs, lr=2e-3, progress=False)
        trained = Binarize(method=method, stage="train", **options)(ctx.fp32)
        train(trained.module, batches_of(*ctx.train, 64, shuffle=True), config, teacher=ctx.fp32.module)
        deployed = Binarize(method=method, **options)(trained)
        return deployed, f"binarize:method={method}; {epochs} epochs distilled from fp32; {note}"
    return make


def _sketch(ctx: Context) -> tuple[Any, str]:
    from passes import NetworkSketching

    p = NetworkSketching(planes=2, method="refined")
    return p(ctx.fp32), f"{p.spec()}; no retraining; weights only (float activations), one kernel per plane"


METHODS: tuple[Method, ...] = (
    Method("bireal", "Liu et al., Bi-Real Net: Enhancing the Performance of 1-bit CNNs, ECCV 2018",
           _binary("bireal", "ApproxSign + magnitude-aware weights; no shortcut fits LeNet-5 (every binarized "
                             "layer changes shape)")),
    Method("tang-bnn", "Tang, Hua & Wang, How to Train a Compact Binary Neural Network with High Accuracy?, AAAI 2017",
           _binary("tang", "PReLU + BN after each binary layer, scale layer, bipolar regularizer, cosine LR")),
    Method("tbn", "Wan et al., TBN: Convolutional Neural Network with Ternary Inputs and Binary Weights, ECCV 2018",
           _binary("tbn", "ternary activations (2 bit-planes) x binary weights")),
    Method("network-sketching", "Guo et al., Network Sketching: Exploiting Binary Structure in Deep CNNs, CVPR 2017",
           _sketch),
)
