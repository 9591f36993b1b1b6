"""Rows of the survey-methods suite (survey_methods.py): binary and low-bit methods (issue 23: Network Sketching, Local Binary CNN, ADMM, Tang et al., Bi-Real Net, TBN, Two-Step Quantization).

The training methods follow the demo's binarized recipe: STE layers fine-tuned with distillation from
the fp32 LeNet-5 (10 epochs, 2 in quick mode), then packed into bit-planes; first and last layer fp32."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

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


def _lbc(ctx: Context) -> tuple[Any, str]:
    from compiler.finetune import TrainConfig, batches_of, train
    from passes import LocalBinaryConv

    epochs = 2 if ctx.quick else 10
    p = LocalBinaryConv(stage="train", sparsity=0.5)
    trained = p(ctx.fp32)
    train(trained.module, batches_of(*ctx.train, 64, shuffle=True), TrainConfig(epochs=epochs, lr=2e-3, progress=False),
          teacher=ctx.fp32.module)
    return LocalBinaryConv(sparsity=0.5)(trained), (f"{p.spec()}; conv2 -> 16 fixed ±1/0 anchors (50 % non-zero) + "
                                                  f"ReLU + learned 1x1; {epochs} epochs distilled (only the 1x1 learns)")


def _admm(ctx: Context) -> tuple[Any, str]:
    from compiler.finetune import batches_of, train
    from passes import Binarize, admm_config

    epochs = 2 if ctx.quick else 10
    trained = Binarize(method="admm", stage="train", w_bits=3)(ctx.fp32)
    train(trained.module, batches_of(*ctx.train, 64, shuffle=True), admm_config(epochs=epochs, progress=False),
          teacher=ctx.fp32.module)
    return Binarize(method="admm", w_bits=3)(trained), (f"binarize:method=admm,w_bits=3; alpha * {{0, ±1, ±2, ±4}} per layer; "
                                                       f"{epochs} epochs ADMM (rho 10, G/U every 15 steps) distilled")


def _tsq(ctx: Context) -> tuple[Any, str]:
    from compiler.finetune import TrainConfig, batches_of, train
    from passes import TwoStepQuantization

    epochs = 1 if ctx.quick else 5
    calib = (ctx.train[0][:256],)
    config = TrainConfig(epochs=epochs, lr=1e-3, progress=False)
    g = TwoStepQuantization(step="codes", calibration=calib)(ctx.fp32)
    train(g.module, batches_of(*ctx.train, 64, shuffle=True), config, teacher=ctx.fp32.module)
    g = TwoStepQuantization(step="weights", calibration=calib)(g)
    train(g.module, batches_of(*ctx.train, 64, shuffle=True), config, teacher=ctx.fp32.module)
    return TwoStepQuantization(calibration=calib)(g), (f"two-step-quantization: 2-bit sparse activations, ternary weights; "
                                                      f"{epochs}+{epochs} epochs (codes, then weights) distilled")


class RowLSTM(nn.Module):
    """The demo's images read row by row: a 28-step sequence of 28 pixels, an LSTM, the last step."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(28, 64, batch_first=True)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        y, _ = self.rnn(x.reshape(x.shape[0], 28, 28))
        return self.fc(y[:, -1])


def _alternating_lstm(ctx: Context) -> tuple:
    """Xu et al.'s 2-bit alternating quantization of an LSTM's gate weights (the fc stays fp32)."""
    import compiler
    from compiler.finetune import TrainConfig, batches_of, train
    from passes import NetworkSketching

    torch.manual_seed(0)
    model, epochs = RowLSTM(), 1 if ctx.quick else 4
    train(model, batches_of(*ctx.train, 64, shuffle=True, seed=0), TrainConfig(epochs=epochs, lr=3e-3, progress=False))
    fp32 = compiler.trace(model.eval(), (ctx.test[0][:1],))
    quantized = NetworkSketching(method="alternating", planes=2, keep_first_last=False, exclude=("fc",))(fp32)
    return quantized, (f"LSTM(28→64) over the image rows, {epochs} epochs; gate weights 2 binary planes per row "
                       "(alternating, 2 rounds), no retraining; activations float; fp32 columns are this LSTM's"), fp32


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
    Method("local-binary-cnn", "Juefei-Xu, Boddeti & Savvides, Local Binary Convolutional Neural Networks, CVPR 2017",
           _lbc),
    Method("admm", "Leng et al., Extremely Low Bit Neural Network: Squeeze the Last Bit Out with ADMM, AAAI 2018",
           _admm),
    Method("two-step-quantization", "Wang et al., Two-Step Quantization for Low-bit Neural Networks, CVPR 2018", _tsq),
    Method("alternating-lstm", "Xu et al., Alternating Multi-bit Quantization for Recurrent Neural Networks, ICLR 2018",
           _alternating_lstm),
)
