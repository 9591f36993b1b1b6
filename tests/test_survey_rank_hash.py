"""Issue 23, four more of the survey's methods, each tested on the property its paper relies on:
HashedNets (Chen et al. 2015, pass ``hashed``, op ``squeezer::hashed_linear``), Deep k-Means (Wu et
al. 2018, pass ``deep-kmeans``), compression-aware training (Alvarez & Salzmann 2017) and Trained
Rank Pruning (Xu et al. 2020) (pass ``low-rank-train``). A tiny conv + linear model on synthetic
learnable data keeps the file to seconds (the builds dominate)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import compiler
from compiler.errors import OptionError, PassError
from compiler.finetune import TrainConfig, train
from compiler.ops.hashed import HashedLinear, hash_tables, hashed_linear
from compiler.ops.lut_linear import LutLinear
from trained_task import compiled_matches_torch, tiny_task
from passes import DeepKMeans, HashedNets, RankTraining
from passes.deep_kmeans import relaxed_kmeans, sub_vectors, top_eigenvectors, vector_kmeans, within_cluster_ss
from passes.low_rank import svd_split
from passes.rank_training import (NuclearNorm, ProximalNuclear, RankSubstitution, energy_rank, group_soft_threshold,
                                  matrix_of, numerical_rank, singular_value_soft_threshold, split_error)


# ---- HashedNets ------------------------------------------------------------------------------------------
def _lowbias32(x: int) -> int:
    """Wellons' lowbias32 with Python's exact integers, every product reduced mod 2**32 by hand."""
    x ^= x >> 16
    x = (x * 0x21F0AAAD) % 2 ** 32
    x ^= x >> 15
    x = (x * 0x735A2D97) % 2 ** 32
    return x ^ (x >> 15)


def test_hashed_virtual_weight_is_sign_times_bucket_of_the_hash():
    n, k, buckets, seed = 5, 7, 11, 3
    layer = HashedLinear(torch.randn(buckets), None, seed, n, k)
    idx, sign = hash_tables(n, k, buckets, seed)
    v = layer.decoded_weight().detach()
    for i in range(n):
        for j in range(k):
            key = i * k + j
            h = _lowbias32((key + 2 * seed * 0x9E3779B9) % 2 ** 32) % buckets
            xi = -1.0 if _lowbias32((key + (2 * seed + 1) * 0x9E3779B9) % 2 ** 32) >> 31 else 1.0
            assert (int(idx[i, j]), float(sign[i, j])) == (h, xi)
            assert float(v[i, j]) == xi * float(layer.buckets[h].detach())
    assert {-1.0, 1.0} == set(sign.unique().tolist()) and len(idx.unique()) > buckets // 2   # both signs, spread
    assert layer.stored_bytes() == 4 * buckets                  # only the buckets are stored


def test_positions_hashing_to_one_bucket_share_its_gradient():
    torch.manual_seed(0)
    n, k, buckets, seed = 6, 8, 5, 1
    x, r = torch.randn(3, k, dtype=torch.float64), torch.randn(3, n, dtype=torch.float64)
    w = torch.randn(buckets, dtype=torch.float64, requires_grad=True)
    (hashed_linear(x, w, None, seed, n, k) * r).sum().backward()
    idx, sign = hash_tables(n, k, buckets, seed)
    v = (sign.double() * w.detach()[idx]).requires_grad_()
    (x @ v.T * r).sum().backward()                               # dL/dV of the same virtual weight
    b = int(idx.reshape(-1).bincount().argmax())                 # a bucket several positions share
    shared = idx == b
    assert int(shared.sum()) >= 2
    assert float(w.grad[b]) == pytest.approx(float((sign.double() * v.grad)[shared].sum()), rel=1e-12)
    expected = torch.zeros(buckets, dtype=torch.float64).index_add_(0, idx.reshape(-1), (sign * v.grad).reshape(-1))
    torch.testing.assert_close(w.grad, expected)                 # Σ_{h(i,j)=b} ξ(i,j) ∂L/∂V[i,j], every bucket
    torch.autograd.gradcheck(lambda a, b_: hashed_linear(a, b_, None, seed, n, k),
                             (x.clone().requires_grad_(), w.detach().clone().requires_grad_()))


def test_hashed_pass_trains_buckets_stores_only_them_and_compiles(tmp_path):
    graph, x, y = tiny_task()
    p = HashedNets(epochs=2, batch_size=16, compression=4, hash_seed=123456789, train_data=(x, y))
    result = p.apply(graph)
    layer = result.graph.module.get_submodule("3")
    assert isinstance(layer, HashedLinear) and layer.num_buckets == 144 * 10 // 4 == result.report.stats["buckets"]
    assert layer.stored_bytes() == 4 * (layer.num_buckets + 10)   # K buckets (+ the bias), no index
    start = HashedLinear.from_linear(graph.module.get_submodule("3"), 360, seed=123456789)
    assert not torch.equal(start.buckets, layer.buckets)          # the buckets were trained
    assert any("convolutions are left dense" in why for _, why in result.report.skipped)
    compiler.save(result.graph, tmp_path / "hashed.safetensors")   # the seed and shapes travel with the buckets
    torch.testing.assert_close(compiler.load(tmp_path / "hashed.safetensors").module(x[:4]), result.graph.module(x[:4]),
                               rtol=0, atol=0)
    compiled_matches_torch(result.graph, x, rtol=1e-5)


# ---- Deep k-Means ----------------------------------------------------------------------------------------
def test_relaxed_kmeans_is_its_definition_and_lower_bounds_the_within_cluster_ss():
    torch.manual_seed(0)
    w = torch.randn(6, 40, dtype=torch.float64)                  # 40 samples of dimension 6
    k = 3
    f = top_eigenvectors(w, k)
    gram = w.T @ w
    definition = torch.trace(gram) - torch.trace(f.T @ gram @ f)
    torch.testing.assert_close(relaxed_kmeans(w, f), definition)
    eig = torch.linalg.eigvalsh(gram).flip(0)
    torch.testing.assert_close(definition, eig[k:].sum())         # = the Gram spectrum beyond the top k
    centroids, labels = vector_kmeans(w, k)
    assert float(definition) <= within_cluster_ss(w, centroids, labels)
    for s in range(5):                                           # ... and the SS of any k-clustering
        lab = torch.randint(k, (40,), generator=torch.Generator().manual_seed(s))
        means = torch.stack([w.T[lab == c].mean(0) for c in range(k)])
        assert float(definition) <= within_cluster_ss(w, means, lab)
    assert float(relaxed_kmeans(w, top_eigenvectors(w, 6))) == pytest.approx(0.0, abs=1e-9)   # k >= d: vanishes


def test_deep_kmeans_retraining_lowers_the_clustering_error_and_compiles():
    graph, x, y = tiny_task()
    common = dict(epochs=3, batch_size=16, k=8, d=16, train_data=(x, y))
    plain = DeepKMeans(lam=0.0, **common).apply(graph)
    result = DeepKMeans(lam=1.0, finetune=1, **common).apply(graph)
    # measured 0.633 vs 0.700 (the relaxation is the PCA residual beyond rank k: it flattens the
    # sub-vectors onto k dimensions, the spread within them stays)
    assert result.report.stats["relative_clustering_error"] < 0.95 * plain.report.stats["relative_clustering_error"]
    assert float(result.report.stats["relaxed_kmeans"].split(" -> ")[1]) < 0.5 * float(
        plain.report.stats["relaxed_kmeans"].split(" -> ")[1])
    layer = result.graph.module.get_submodule("3")
    assert isinstance(layer, LutLinear) and layer.bits == 8 and layer.codebook.numel() == 8 * 16
    runs = sub_vectors(layer.decoded_weight().detach(), 16)       # every run of 16 weights is one of 8 centroids,
    assert "finetune_loss" in result.report.stats                 # after the centroids' fine-tuning too
    assert len(runs.T.unique(dim=0)) <= 8
    assert ("0", "4 sub-vectors: no more than k=8") in result.report.skipped   # 4 rows of 9 weights, padded to 16
    compiled_matches_torch(result.graph, x, rtol=1e-5)


# ---- compression-aware training / Trained Rank Pruning ------------------------------------------------
def test_cat_proximal_step_is_singular_value_soft_thresholding():
    torch.manual_seed(0)
    w, t = torch.randn(7, 5, dtype=torch.float64), 0.8
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    out = singular_value_soft_threshold(w, t)
    torch.testing.assert_close(out, u @ torch.diag((s - t).clamp_min(0)) @ vh)
    torch.testing.assert_close(torch.linalg.svdvals(out), (s - t).clamp_min(0), atol=1e-12, rtol=0)
    objective = lambda z: 0.5 * (z - w).pow(2).sum() + t * torch.linalg.matrix_norm(z, "nuc")  # noqa: E731
    for _ in range(20):                                           # the prox minimizes ½||Z − W||² + t||Z||_*
        assert float(objective(out)) <= float(objective(out + 1e-2 * torch.randn_like(out))) + 1e-12
    g = group_soft_threshold(torch.tensor([[3.0, 4.0], [0.1, 0.1]]), 1.0)
    torch.testing.assert_close(g, torch.tensor([[3.0, 4.0], [0.0, 0.0]]) * torch.tensor([[1 - 2 ** 0.5 / 5], [0.0]]))


def test_cat_training_reduces_the_numerical_rank_and_the_split_is_exact():
    graph, x, y = tiny_task()
    names = ["0", "3"]
    before = {n: numerical_rank(graph.module.get_submodule(n).weight, 1e-3) for n in names}
    train(graph.module, TensorDataset(x, y), TrainConfig(epochs=3, batch_size=16, progress=False,
                                                         step_callback=ProximalNuclear(names, 1e-3, 20.0, 0.0)))
    after = {n: numerical_rank(graph.module.get_submodule(n).weight, 1e-3) for n in names}
    assert sum(after.values()) < sum(before.values()) and all(after[n] <= before[n] for n in names)
    fc = graph.module.get_submodule("3")
    chain = svd_split(fc, after["3"])
    feats = torch.relu(graph.module.get_submodule("0")(x)).flatten(1)
    assert split_error(fc, chain, feats) < 1e-5                   # exact at the kept rank
    result = RankTraining(method="cat", tau=20.0, epochs=3, batch_size=16, train_data=(x, y)).apply(tiny_task()[0])
    assert "3: 10 -> " in result.report.stats["ranks"] and result.report.changed
    compiled_matches_torch(result.graph, x)


def test_trp_substitutes_energy_rank_weights_and_the_final_split_reproduces_the_layer():
    graph, x, y = tiny_task()
    names, energy = ["0", "3"], 0.9
    seen = []

    class Checked(RankSubstitution):
        def substitute(self, model):
            wanted = {n: energy_rank(torch.linalg.svdvals(matrix_of(model.get_submodule(n).weight).detach()), energy)
                      for n in names}
            super().substitute(model)
            for n in names:
                assert self.ranks[n] == wanted[n] == numerical_rank(model.get_submodule(n).weight, 1e-5)
            seen.append(dict(self.ranks))

    sub = Checked(names, energy, period=4)
    train(graph.module, TensorDataset(x, y), TrainConfig(epochs=2, batch_size=16, progress=False, step_callback=sub,
                                                         regularizer=NuclearNorm(names, 1e-3)))
    assert len(seen) == 4 and seen[-1]["3"] < 10                  # 16 steps, every 4th; the rank fell
    sub.substitute(graph.module)
    fc = graph.module.get_submodule("3")
    feats = torch.relu(graph.module.get_submodule("0")(x)).flatten(1)
    assert split_error(fc, svd_split(fc, sub.ranks["3"]), feats) < 1e-5   # the split reproduces the trained layer
    result = RankTraining(method="trp", energy=energy, period=4, epochs=2, batch_size=16,
                          train_data=(x, y)).apply(tiny_task()[0])
    assert result.report.changed and isinstance(result.graph.module.get_submodule("3"), nn.Sequential)


# ---- options, specs, CLI ----------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, option", [("hashed:compression=0.5", "compression"),
                                          ("hashed:hash_seed=-1", "hash_seed"),
                                          ("deep-kmeans:k=16", "k"), ("deep-kmeans:d=32,k=9", "k"),
                                          ("deep-kmeans:lam=-1", "lam"),
                                          ("low-rank-train:method=svd", "method"),
                                          ("low-rank-train:energy=0", "energy"),
                                          ("low-rank-train:period=0", "period")])
def test_bad_options_name_the_option(spec, option):
    with pytest.raises(OptionError, match=f"'{option}'"):
        compiler.parse_pass_spec(spec)


def test_specs_round_trip_are_listed_and_need_data(capsys):
    from squeezer.cli import main

    p = compiler.parse_pass_spec("low-rank-train:method=trp,energy=0.8")
    assert isinstance(p, RankTraining) and p.spec() == "low-rank-train:method=trp,energy=0.8"
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("hashed", "deep-kmeans", "low-rank-train"))
    graph, _, _ = tiny_task()
    for spec in ("hashed", "deep-kmeans", "low-rank-train"):
        with pytest.raises(PassError, match="trains on data"):
            compiler.parse_pass_spec(spec)(graph)
