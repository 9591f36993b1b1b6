"""Rows of the survey-methods suite (survey_methods.py): weight-sharing, sparsity and low-rank-training methods (issue 23: HashedNets, soft weight-sharing, Deep k-Means, VNQ, L0, variational dropout, compression-aware training, Trained Rank Pruning)."""

from __future__ import annotations

from typing import Any

from .survey_common import Context, Method


def _soft_sharing(ctx: Context) -> tuple[Any, str]:
    from passes import TrainedClustering

    p = TrainedClustering(method="soft", bits=4, tau=2e-5, epochs=4 if ctx.quick else 8, train_data=ctx.train)
    r = p.apply(ctx.fp32)
    s = r.report.stats
    return r.graph, (f"{p.spec()}; 16-component mixture prior (π0 = 0.99), {s['zero_component_share']:.1%} of the "
                     f"weights in the zero component; prior NLL {s['prior_nll']}; LUT / CSR + codebook layers")


def _sparse(method: str, **options: Any):
    def make(ctx: Context) -> tuple[Any, str]:
        from passes import TrainedSparsity

        p = TrainedSparsity(method=method, epochs=2 if ctx.quick else 5, train_data=ctx.train, **options)
        r = p.apply(ctx.fp32)
        return r.graph, f"{p.spec()}; {r.report.stats['sparsity']:.1%} of the weights pruned; CSR layers"
    return make


METHODS: tuple[Method, ...] = (
    Method("soft-weight-sharing", "Ullrich, Meeds & Welling, Soft Weight-Sharing for Neural Network Compression, "
                                  "ICLR 2017", _soft_sharing),
    Method("l0", "Louizos, Welling & Kingma, Learning Sparse Neural Networks through L0 Regularization, ICLR 2018",
           _sparse("l0", l0_lambda=1e-3)),
    Method("variational-dropout", "Molchanov, Ashukha & Vetrov, Variational Dropout Sparsifies Deep Neural Networks, "
                                  "ICML 2017", _sparse("vd")),
)
