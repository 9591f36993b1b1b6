"""codegen: every foundation architecture compiled for this CPU matches PyTorch; export/load is
verified, torch-free, and fails clearly on damaged artifacts; CUDA builds without a GPU."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from tiers import sweep, zoo_sweep
import torch
from torch import nn

import codegen
import compiler
import tvm
from squeezer import zoo
from compiler.ops import LutLinear

ATOL = 1e-4


def _build(name, batch=1):
    e = zoo.get(name)
    model = e.build()
    x = e.example_inputs(batch=batch)
    return model, x, codegen.build(compiler.trace(model, x), "llvm")


@pytest.mark.parametrize("name", zoo_sweep(zoo.ZOO))
def test_build_matches_pytorch(name):
    model, x, m = _build(name, batch=2)
    with torch.no_grad():
        ref = model(*x).numpy()
    out = m(*x)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=0)


class LutNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = LutLinear.from_linear(nn.Linear(64, 48), 4)
        self.b = LutLinear.from_linear(nn.Linear(48, 10, bias=False), 2)
        self.c = LutLinear.from_linear(nn.Linear(10, 10), 1)

    def forward(self, x):
        return self.c(self.b(torch.relu(self.a(x))))


@pytest.mark.parametrize("shape", sweep([(3, 64), (2, 5, 64)], quick=[]))
def test_lut_linear_through_tvm_matches_torch(shape):
    model = LutNet().eval()
    x = torch.randn(*shape)
    m = codegen.build(compiler.trace(model, x))
    np.testing.assert_allclose(m(x), model(x).detach().numpy(), atol=ATOL, rtol=0)


def test_lut_kernel_reads_packed_bytes_not_a_dense_weight(tmp_path):
    """The exported library must hold the 4-bit packed indices; a folded fp32 weight would be 8x larger."""
    model = nn.Sequential(LutLinear.from_linear(nn.Linear(1024, 512), 4)).eval()
    x = torch.randn(1, 1024)
    d = codegen.build(compiler.trace(model, x)).export(tmp_path / "lut")
    size = (d / "model.so").stat().st_size
    assert size < 1024 * 512 * 4 / 2, size  # dense fp32 weight alone would be 2 MiB
    np.testing.assert_allclose(codegen.load(d)(x), model(x).detach().numpy(), atol=ATOL)


def test_inputs_accept_numpy_and_torch_and_are_checked():
    model, x, m = _build("lenet5")
    np.testing.assert_array_equal(m(x[0]), m(x[0].numpy()))
    with pytest.raises(ValueError, match=r"compiled for \(1, 1, 28, 28\)"):
        m(np.zeros((2, 1, 28, 28), np.float32))
    with pytest.raises(ValueError, match="dtype float64"):
        m(np.zeros((1, 1, 28, 28)))
    with pytest.raises(ValueError, match="expected 1 input"):
        m()
    stats = m.benchmark(number=2, repeat=2, min_repeat_ms=0)
    assert stats["median_ms"] > 0


LOADER = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None          # prove the artifact loads without torch
    import numpy as np, codegen
    m = codegen.load(sys.argv[1])
    out = m(np.load(sys.argv[2]))
    np.save(sys.argv[3], out)
    print("torch" in sys.modules and sys.modules["torch"] is not None)
""")


@pytest.mark.slow
def test_export_then_load_in_a_fresh_process_without_torch(tmp_path):
    model, x, m = _build("residual")
    d = m.export(tmp_path / "art")
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["inputs"][0]["shape"] == [1, 3, 32, 32]
    assert manifest["target"]["kind"] == "llvm" and manifest["versions"]["tvm"]
    assert set(manifest["files"]) == {"model.so"} and len(manifest["files"]["model.so"]["sha256"]) == 64
    np.save(tmp_path / "x.npy", x[0].numpy())
    proc = subprocess.run([sys.executable, "-c", LOADER, str(d), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("False")
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), model(*x).detach().numpy(), atol=ATOL)


def test_manifest_records_the_pass_pipeline(tmp_path):
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Identity(compiler.Pass):
        name = "test-identity"
        verify_tolerance = 0.0

        def run(self, graph, report):
            report.change("rewrote nothing, but says it did")   # a pass that changed nothing is not recorded
            return graph

    e = zoo.get("mlp")
    g = compiler.Pipeline([Identity()], verify=True)(compiler.trace(e.build(), e.example_inputs()))
    d = codegen.build(g).export(tmp_path / "p")
    assert json.loads((d / "manifest.json").read_text())["pipeline"] == ["test-identity"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    _, _, m = _build("mlp")
    return m.export(tmp_path_factory.mktemp("art") / "mlp")


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_load_errors_missing_corrupt_mismatched(exported, tmp_path):
    with pytest.raises(compiler.ArtifactError, match="not a directory"):
        codegen.load(tmp_path / "nothing")
    d = _copy(exported, tmp_path / "a")
    (d / "model.so").unlink()
    with pytest.raises(compiler.ArtifactError, match="model.so is missing"):
        codegen.load(d)
    d = _copy(exported, tmp_path / "b")
    with open(d / "model.so", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\xff\x00\xff")
    with pytest.raises(compiler.ArtifactError, match="corrupt or was replaced"):
        codegen.load(d)
    d = _copy(exported, tmp_path / "c")
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(compiler.ArtifactError, match="not valid JSON"):
        codegen.load(d)
    d = _copy(exported, tmp_path / "d")
    (d / "manifest.json").unlink()
    with pytest.raises(compiler.ArtifactError, match="manifest.json is missing"):
        codegen.load(d)
    d = _copy(exported, tmp_path / "e")
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["format"] = "squeezer-module/99"
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(compiler.ArtifactError, match="squeezer-module/99"):
        codegen.load(d)


def test_targets_resolve_to_the_real_host_cpu():
    t = codegen.resolve_target("llvm")
    assert str(t.attrs["mcpu"]) == tvm.target.codegen.llvm_get_system_cpu() != "generic"
    assert "conda" not in str(t.attrs["mtriple"]) and int(t.attrs["num-cores"]) >= 1
    for spec in ({"kind": "llvm", "mcpu": "native"}, '{"kind": "llvm"}', tvm.target.Target("llvm")):
        t2 = codegen.resolve_target(spec)
        assert str(t2.attrs["mcpu"]) == tvm.target.codegen.llvm_get_system_cpu(), spec
        assert "conda" not in str(t2.attrs["mtriple"]) and int(t2.attrs["num-cores"]) >= 1
    assert str(codegen.resolve_target({"kind": "llvm", "mcpu": "skylake-avx512"}).attrs["mcpu"]) == "skylake-avx512"
    with pytest.raises(compiler.OptionError, match="num-cores"):
        codegen.resolve_target({"kind": "llvm", "num-cores": "many"})
    with pytest.raises(compiler.OptionError, match="unknown target 'tpu'"):
        codegen.resolve_target("tpu")
    with pytest.raises(compiler.OptionError, match="not supported"):
        codegen.resolve_target({"kind": "c"})


def test_unsupported_torch_op_is_named():
    class Odd(nn.Module):
        def forward(self, x):
            return torch.special.bessel_j0(x)

    with pytest.raises(compiler.BuildError, match="bessel_j0"):
        codegen.build(compiler.trace(Odd(), torch.randn(4)))


def test_build_rejects_non_graph():
    with pytest.raises(compiler.BuildError, match="compiler.Graph"):
        codegen.build(nn.Linear(2, 2))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lenet5", "attention"])
def test_cuda_build_without_a_gpu_produces_cuda_source(name):
    e = zoo.get(name)
    g = compiler.trace(e.build(), e.example_inputs())
    from codegen.frontend import import_graph
    from codegen.options import BuildOptions
    from codegen.relax_pipeline import pipeline_for

    options = BuildOptions.create("cuda")
    mod, _, _ = import_graph(g, options)
    target = options.target
    ex = tvm.compile(mod, target=target, relax_pipeline=pipeline_for(options))
    sources = []

    def walk(mod_):
        sources.append(mod_.kind)
        for sub in mod_.imports:
            walk(sub)

    walk(ex.mod)
    assert "cuda" in sources
    m = codegen.build(g, "cuda")  # the public path too: builds and exports with no GPU present
    assert "__global__" in m.kernel_source()


@pytest.mark.gpu
@pytest.mark.skipif(not tvm.cuda(0).exist, reason="no CUDA GPU visible")
@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_cuda_matches_pytorch(name):
    e = zoo.get(name)
    model = e.build()
    x = e.example_inputs(batch=2)
    m = codegen.build(compiler.trace(model, x), "cuda")
    np.testing.assert_allclose(m(*x), model(*x).detach().numpy(), atol=ATOL, rtol=0)


def test_missing_or_corrupt_tuning_database_is_a_clear_error(tmp_path):
    e = zoo.get("mlp")
    g = compiler.trace(e.build(), e.example_inputs())
    with pytest.raises(compiler.BuildError, match="has no database_workload.json"):
        codegen.build(g, database=tmp_path)
    (tmp_path / "database_workload.json").write_text("{broken")
    (tmp_path / "database_tuning_record.json").write_text("")
    with pytest.raises(compiler.BuildError, match="corrupt"):
        codegen.build(g, database=tmp_path)


def test_unsupported_op_names_the_layer():
    class Odd(nn.Module):
        def forward(self, x):
            return torch.special.bessel_j0(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.weird = Odd()

        def forward(self, x):
            return self.weird(self.fc(x))

    with pytest.raises(compiler.BuildError, match=r"bessel_j0.*in layer\(s\) \['weird'\]"):
        codegen.build(compiler.trace(Net(), torch.randn(2, 4)))


def test_reexport_of_a_loaded_module_and_unlisted_library(exported, tmp_path):
    loaded = codegen.load(exported)
    again = loaded.export(tmp_path / "again")
    x = loaded.random_inputs()
    np.testing.assert_array_equal(codegen.load(again)(*x), loaded(*x))
    d = _copy(exported, tmp_path / "unlisted")
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["files"] = {}
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(compiler.ArtifactError, match="refusing to load unverified code"):
        codegen.load(d)


class TwoInTwoOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 4), nn.Linear(3, 4)

    def forward(self, x, y):
        h = torch.relu(self.a(x) + self.b(y))
        return h, h.sum(-1)


def test_several_inputs_and_outputs_round_trip(tmp_path):
    model = TwoInTwoOut().eval()
    x, y = torch.randn(2, 6), torch.randn(2, 3)
    m = codegen.build(compiler.trace(model, (x, y)))
    loaded = codegen.load(m.export(tmp_path / "two"))
    assert [s["name"] for s in loaded.inputs] == ["x", "y"] and len(loaded.outputs) == 2
    with torch.no_grad():
        ref = model(x, y)
    for got, want in zip(loaded(x, y), ref):
        np.testing.assert_allclose(got, want.numpy(), atol=ATOL)


class SDPA(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.kw = kw

    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, **self.kw)


class MaskedSDPA(nn.Module):
    def forward(self, q, k, v, mask):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("model, mask", [(SDPA(), None), pytest.param(SDPA(scale=0.3), None, marks=pytest.mark.slow),
                                         pytest.param(SDPA(is_causal=True), None, marks=pytest.mark.slow),
                                         pytest.param(MaskedSDPA(), "float", marks=pytest.mark.slow),
                                         (MaskedSDPA(), "bool")])
def test_attention_variants_match_pytorch(model, mask):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (5, 7, 7))
    extra = () if mask is None else (torch.randn(5, 7, generator=g) if mask == "float"
                                     else torch.rand(5, 7, generator=g) > 0.3,)
    m = codegen.build(compiler.trace(model, (q, k, v, *extra)))
    np.testing.assert_allclose(m(q, k, v, *extra), model(q, k, v, *extra).numpy(), atol=ATOL)


def test_cuda_targets_carry_the_limits_metaschedule_reads():
    """MetaSchedule's GPU rules (AutoBind, cross-thread reduction) refuse a target without them."""
    t = codegen.resolve_target("cuda")
    assert int(t.attrs["max_threads_per_block"]) > 0 and int(t.attrs["max_shared_memory_per_block"]) > 0
    mine = codegen.resolve_target({"kind": "cuda", "arch": "sm_80", "max_threads_per_block": 512})
    assert int(mine.attrs["max_threads_per_block"]) == 512 and str(mine.attrs["arch"]) == "sm_80"


def test_a_cuda_build_rejects_a_kernel_without_thread_binding():
    """A kernel scheduled for the CPU in a CUDA build compiles as host code reading device memory
    (it segfaulted on a GPU): the build must name it instead."""
    from tvm import te

    from codegen.schedules.cuda import check_gpu_kernels

    a = te.placeholder((64,), "float32", name="a")
    b = te.compute((64,), lambda i: a[i] * 2.0, name="b")
    func = te.create_prim_func([a, b]).with_attr("global_symbol", "double")
    with pytest.raises(compiler.BuildError, match="'double' has no GPU thread binding"):
        check_gpu_kernels(tvm.IRModule({"double": func}))


def test_build_neither_copies_nor_runs_the_model_and_encodes_weights_only_when_asked(monkeypatch):
    """Data through build once: output shapes come from the traced graph's metadata, the module is
    exported in place (its training flags restored), and the Huffman encoding of compressed
    weights waits for export / weight_report (a build that is only run or timed never pays it)."""
    import copy

    from codegen import weight_codec
    from passes import Sparsify

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Dropout(0.5), nn.ReLU(), nn.Linear(32, 4))
    g = Sparsify(sparsity=0.9)(compiler.trace(model, (torch.randn(1, 64),)))
    g.module.train()
    runs, copies, encodes = [], [], []
    g.module.register_forward_pre_hook(lambda _m, args: runs.append(1) if type(args[0]) is torch.Tensor else None)
    real_deepcopy, real_encode = copy.deepcopy, weight_codec.encode_smallest
    monkeypatch.setattr(copy, "deepcopy", lambda x, *a, **k: (copies.append(1) if isinstance(x, nn.Module) else None)
                        or real_deepcopy(x, *a, **k))
    monkeypatch.setattr(weight_codec, "encode_smallest", lambda w, **k: encodes.append(1) or real_encode(w, **k))
    cm = codegen.build(g, sparse_kernels="sparse")
    assert not runs and not copies and not encodes
    assert g.module.training and all(m.training for m in g.module.modules())
    np.testing.assert_allclose(cm(*g.example_inputs), g.run_example().numpy(), rtol=1e-5, atol=1e-5)
    assert not encodes and cm.outputs == [{"name": "output0", "shape": [1, 4], "dtype": "float32"}]
    report = cm.weight_report()
    assert encodes and report["deployable_bytes"] >= report["encoded_bytes"] > 0


def test_timed_kernel_choice_keeps_the_faster_measures_once_and_logs_every_decision():
    """kernel_choice.timed_choice (the one helper behind sparse_kernels= and binary_kernels= "auto"):
    the faster median wins, a tie goes to the later candidate, each signature is measured once per
    process, and a failing candidate falls back (with a warning) where a fallback is given."""
    from codegen import kernel_choice as kc

    built = []

    def timers(samples):
        def build_timer(kernel):
            built.append(kernel)
            return lambda: list(samples[kernel])
        return build_timer

    start = len(kc.decisions)
    assert kc.timed_choice("test", "l1", "sig-a", timers({"a": [2, 2, 9], "b": [3, 3, 0]}), ("a", "b")) == "a"
    assert kc.timed_choice("test", "l2", "sig-a", timers({}), ("a", "b")) == "a"   # cached: nothing built
    assert kc.timed_choice("test", "l3", "sig-tie", timers({"a": [1], "b": [1]}), ("a", "b"), rounds=3) == "b"
    assert built == ["a", "b", "a", "b"]
    log = kc.decisions[start:]
    assert [d["layer"] for d in log] == ["l1", "l2", "l3"] and log[0]["ms"] == {"a": 2000.0, "b": 3000.0}

    def broken(kernel):
        raise RuntimeError("no such unit")

    with pytest.warns(UserWarning, match="using b"):
        assert kc.timed_choice("test", "l4", "sig-broken", broken, ("a", "b"), fallback="b") == "b"
    with pytest.raises(RuntimeError):
        kc.timed_choice("test", "l5", "sig-broken2", broken, ("a", "b"))
    assert len(kc.decisions) == start + 3


def test_host_target_adds_the_features_the_cpu_reports_beyond_its_llvm_name(monkeypatch):
    """A VM may present a CPU model LLVM names without AMX (rocketlake) while Linux reports amx:
    the host target then carries +amx-int8, and a CPU name that has a feature gets no extra."""
    from codegen import target as tg

    triple = tg._host_triple()
    if not triple.startswith("x86_64"):
        pytest.skip("x86 features")
    monkeypatch.setattr(tg, "_linux_cpu_flags", lambda: {"amx_tile", "amx_int8", "avx512_vnni"})
    assert {"+amx-tile", "+amx-int8", "+avx512vnni"} <= set(tg.host_features("skylake", triple))
    assert "+amx-int8" not in tg.host_features("sapphirerapids", triple)
    monkeypatch.setattr(tg, "_linux_cpu_flags", lambda: set())
    assert tg.host_features("skylake", triple) == []


@pytest.mark.parametrize("pool", [torch.nn.MaxPool2d(3, 2, 1), torch.nn.MaxPool2d(2), torch.nn.MaxPool2d(3, 1, 1, ceil_mode=True)])
def test_a_max_pool_left_in_nchw_runs_in_nhwc_and_matches_torch(pool):
    """A pooling whose input no conv moved to NHWC (here: the model's input) is rewritten to an
    NHWC pool between transposes (codegen/pool_layout.py); NaN still propagates as in torch."""
    from codegen.frontend import import_graph
    from codegen.lowering.context import RuntimeWeights
    from codegen.options import BuildOptions
    from codegen.pool_layout import NHWCMaxPool

    model, x = torch.nn.Sequential(pool), torch.randn(2, 8, 13, 14)
    x[0, 1, 4, 5] = float("nan")
    g = compiler.trace(model, (x,))
    options = BuildOptions.create("llvm")
    script = NHWCMaxPool()(import_graph(g, options, RuntimeWeights())[0]).script()
    assert 'layout="NHWC"' in script and "permute_dims" in script
    np.testing.assert_allclose(codegen.build(g, "llvm")(x), model(x).numpy(), rtol=0, atol=0)
