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


def _hashed(ctx: Context) -> tuple[Any, str]:
    from passes import HashedNets

    p = HashedNets(compression=8, epochs=2 if ctx.quick else 5, train_data=ctx.train)
    r = p.apply(ctx.fp32)
    return r.graph, (f"{p.spec()}; Linear layers hashed into {r.report.stats['buckets']:,} buckets (1/8 of their "
                     "weights), convs dense; the kernel computes the hash")


def _deep_kmeans(ctx: Context) -> tuple[Any, str]:
    from passes import DeepKMeans

    p = DeepKMeans(k=15, d=16, epochs=2 if ctx.quick else 5, finetune=1 if ctx.quick else 3, train_data=ctx.train)
    r = p.apply(ctx.fp32)
    s = r.report.stats
    return r.graph, (f"{p.spec()}; relaxed k-means {s['relaxed_kmeans']}; clustering error "
                     f"{s['relative_clustering_error']:.3f} of ||W||², centroid fine-tune {s.get('finetune_loss')}; "
                     "8-bit LUT layers (codebook k·d = 240)")


def _rank_training(method: str, **options: Any):
    def make(ctx: Context) -> tuple[Any, str]:
        from passes import RankTraining

        p = RankTraining(method=method, epochs=2 if ctx.quick else 5, train_data=ctx.train, **options)
        r = p.apply(ctx.fp32)
        return r.graph, f"{p.spec()}; numerical ranks {r.report.stats['ranks']}; SVD-split layers"
    return make


METHODS: tuple[Method, ...] = (
    Method("soft-weight-sharing", "Ullrich, Meeds & Welling, Soft Weight-Sharing for Neural Network Compression, "
                                  "ICLR 2017", _soft_sharing),
    Method("l0", "Louizos, Welling & Kingma, Learning Sparse Neural Networks through L0 Regularization, ICLR 2018",
           _sparse("l0", l0_lambda=1e-3)),
    Method("variational-dropout", "Molchanov, Ashukha & Vetrov, Variational Dropout Sparsifies Deep Neural Networks, "
                                  "ICML 2017", _sparse("vd")),
    Method("hashednets", "Chen et al., Compressing Neural Networks with the Hashing Trick, ICML 2015", _hashed),
    Method("deep-kmeans", "Wu et al., Deep k-Means: Re-Training and Parameter Sharing with Harder Cluster Assignments "
                          "for Compressing Deep Convolutions, ICML 2018", _deep_kmeans),
    Method("compression-aware", "Alvarez & Salzmann, Compression-aware Training of Deep Networks, NIPS 2017",
           _rank_training("cat", tau=3.0)),
    Method("trained-rank-pruning", "Xu et al., Trained Rank Pruning for Efficient Deep Neural Networks, IJCAI 2020",
           _rank_training("trp", energy=0.9)),
)


def _vnq(ctx: Context) -> tuple[Any, str]:
    from passes import TrainedClustering

    p = TrainedClustering(method="vnq", epochs=2 if ctx.quick else 8, train_data=ctx.train)
    r = p.apply(ctx.fp32)
    s = r.report.stats
    return r.graph, (f"{p.spec()}; ternary (-a, 0, a) per layer, a = {s['scales']}; {s['sparsity']:.1%} of the "
                     f"weights 0; quantization error {s['quantization_error']} (of ||θ||²), KL {s['kl']}; no "
                     "fine-tuning; 2-bit LUT / CSR + codebook layers")


METHODS += (
    Method("vnq", "Achterhold, Köhler, Schmeink & Genewein, Variational Network Quantization, ICLR 2018", _vnq),
)
