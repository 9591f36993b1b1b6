"""The benchmark harness runs end to end on one small model (timings are not asserted: tests check
correctness, benchmarks check speed)."""

import json

import pytest

from benchmarks import main


@pytest.mark.slow
def test_compiled_vs_eager_quick_on_one_model(tmp_path):
    assert main(["compiled-vs-eager", "--quick", "--models", "mlp", "--out", str(tmp_path)]) == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert any(f.endswith(".json") for f in files) and any(f.endswith(".md") for f in files)
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    rows = data["rows"] if "rows" in data else data["results"]
    (row,) = rows
    assert row["model"] == "mlp" and row["max_abs_err"] <= 1e-4
    assert row["tvm_ms"] > 0 and row["eager_ms"] > 0


@pytest.mark.slow
def test_pruning_accuracy_quick(tmp_path):
    assert main(["pruning-accuracy", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "pruning_accuracy_quick.json").read_text())
    assert [r["criterion"] for r in data["rows"]] == ["l1", "random"]
    assert all(0.45 < r["mac_cut"] < 0.7 and r["acc_finetuned"] > 0.9 for r in data["rows"])


def test_gpu_check_baselines_travel_as_shapes_and_failed_rows_show_their_error(tmp_path):
    """The prepared GPU check: a dense Linear/Conv2d baseline is rebuilt on the GPU machine from its
    shape (a 4096² fp32 weight would be 64 MB of the 64 MiB a device call carries); a model travels
    pickled; a failed row keeps its error in the table."""
    import torch
    from torch import nn

    from benchmarks.gpu_check import CHECK_COLUMNS, _baseline, _layer_spec, _table

    for layer in (nn.Linear(64, 32, bias=False), nn.Conv2d(8, 16, 3, stride=2, padding=1)):
        rebuilt = _baseline(tmp_path, "x", {"baseline_layer": _layer_spec(layer)})
        x = torch.randn(2, 64) if isinstance(layer, nn.Linear) else torch.randn(1, 8, 9, 9)
        assert type(rebuilt) is type(layer) and rebuilt(x).shape == layer(x).shape
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    assert _layer_spec(model) is None
    torch.save(model, tmp_path / "m.baseline.pt")
    assert isinstance(_baseline(tmp_path, "m", {"baseline_layer": None}), nn.Sequential)
    table = _table([{"model": "m", "batch": 1, "baseline": "fp32 model", "error": "RuntimeError: boom"}], CHECK_COLUMNS)
    assert "| m | 1 | fp32 model | FAILED: RuntimeError: boom |" in table


def test_kernel_profile_counts_each_kernels_macs_and_calls():
    """The per-kernel profile's work column is exact (each conv's MACs), every conv kernel is timed, and the
    FMA roofline it is stated against computes what it should."""
    import torch
    from torch import nn

    import compiler
    from benchmarks.fma_roofline import fma_roofline_gmacs
    from benchmarks.kernel_profile import profile_graph

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1)).eval()
    rows = profile_graph(compiler.trace(model, (torch.randn(1, 8, 10, 10),)))
    macs = {r["kernel"]: r["mmacs"] * 1e6 for r in rows}
    conv_macs = sorted(round(v) for k, v in macs.items() if "conv2d" in k)
    assert conv_macs == [100 * 16 * 8 * 9, 100 * 16 * 16 * 9, 100 * 16 * 16 * 9], macs
    assert all(r["ms"] and r["ms"] > 0 for r in rows if "conv2d" in r["kernel"])
    assert fma_roofline_gmacs() > 0.1


def test_realized_cut_splits_the_deficit_into_efficiency_and_allocation():
    """The decomposition is exact (efficiency + allocation = deficit, per call and in total), a layer the
    pass left whole counts as allocation, a kernel slower than its MACs as efficiency; real builds of a
    small CNN line up call by call and every conv is timed."""
    import pytest
    import torch
    from torch import nn

    import compiler
    from benchmarks.realized_cut import decompose, kernel_calls_timed, kernel_kind
    from passes import ChannelPruning

    # call 0 unpruned (r = 1), call 1 halved but 1.5x slower than its MACs say; MAC ratio R = 300/400
    parts = decompose([("conv0", 1.0, 100), ("conv1", 2.0, 300)], [("conv0", 1.0, 100), ("conv1", 1.5, 200)])
    assert parts["mac_ratio"] == pytest.approx(0.75)
    first, second = parts["calls"]
    assert first["efficiency_ms"] == pytest.approx(0.0) and first["allocation_ms"] == pytest.approx(0.25)
    assert second["efficiency_ms"] == pytest.approx(1.5 - 2.0 * 2 / 3) and second["allocation_ms"] < 0
    for c in parts["calls"]:
        assert c["efficiency_ms"] + c["allocation_ms"] + c["structure_ms"] == pytest.approx(c["deficit_ms"])
    assert parts["realized_cut"] + parts["lost_efficiency"] + parts["lost_allocation"] == pytest.approx(1.0)
    # a call only the dense build makes (renumbered kernels still line up by kind)
    parts = decompose([("conv0", 1.0, 100), ("slice3", 0.5, 0), ("conv1", 2.0, 300)],
                      [("conv4_prepacked", 0.5, 50), ("conv5", 1.0, 150)])
    assert [c["kernel"] for c in parts["calls"]] == ["conv4_prepacked", "slice3 (dense only)", "conv5"]
    assert parts["calls"][1]["structure_ms"] == pytest.approx(-0.5 * 0.5)
    assert parts["realized_cut"] + sum(parts[f"lost_{p}"] for p in ("efficiency", "allocation", "structure")) \
        == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no MAC cut to realize"):
        decompose([("conv0", 1.0, 100)], [("conv0", 1.0, 100)])

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 8, 1)).eval()
    dense = compiler.trace(model, (torch.randn(1, 3, 16, 16),))
    pruned = ChannelPruning(ratio=0.5)(dense)
    dense_calls, pruned_calls = kernel_calls_timed([dense, pruned], rounds=2)
    # the same kernels call by call (a weight one vector wide needs no prepacking: on an AVX2 CPU the
    # pruned 16-channel conv's kernel is not '_prepacked' where the dense 32-channel one is)
    assert [kernel_kind(d[0]) for d in dense_calls] == [kernel_kind(p[0]) for p in pruned_calls]
    assert all(d[1] > 0 and p[1] > 0 for d, p in zip(dense_calls, pruned_calls))
    # the reducing kernels: conv 3->32 (halved outputs), the 3x3 32->32 as Winograd's batched GEMM
    # (both sides halved), the 1x1 32->8 (halved inputs)
    assert [p[2] / d[2] for d, p in zip(dense_calls, pruned_calls) if d[2]] == [0.5, 0.25, 0.5]


def test_real_models_give_zero_initialized_layers_random_weights():
    """vit_b_16's head starts at zero (weights=None): the suite's rel err would compare zeros."""
    import torch
    from torch import nn

    from benchmarks.real_models import without_zero_layers

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    nn.init.zeros_(model[1].weight)
    kept = model[0].weight.detach().clone()
    without_zero_layers(model)
    assert model[1].weight.detach().any() and torch.equal(model[0].weight.detach(), kept)
    assert model(torch.randn(2, 8)).abs().max() > 0


def test_build_coverage_weights_make_the_output_depend_on_the_input():
    """googlenet's own init (std 0.01) shrinks its features to nothing: the logits are the
    classifier's bias and a numerics check passes whatever the kernels compute."""
    import torch
    from torch import nn

    from benchmarks.build_coverage import conditioned
    from benchmarks.harness import rel_err as _rel_err

    torch.manual_seed(0)
    layers = [nn.Conv2d(8, 8, 3, padding=1) for _ in range(12)]
    for layer in layers:
        nn.init.normal_(layer.weight, 0.0, 0.01)
    model = nn.Sequential(*[m for layer in layers for m in (layer, nn.BatchNorm2d(8), nn.ReLU())], nn.Flatten(),
                          nn.Linear(8 * 64, 4)).eval()
    x, other = torch.randn(1, 8, 8, 8), torch.randn(1, 8, 8, 8)
    with torch.no_grad():
        assert _rel_err(model(x), model(other)) < 1e-3
        conditioned(model, x)
        assert not model.training and _rel_err(model(x), model(other)) > 1e-2
        assert all(0.1 < float(bn.running_var.mean()) < 10 for bn in model.modules() if isinstance(bn, nn.BatchNorm2d))


def test_a_sweep_rerun_replaces_its_models_rows_and_keeps_the_others(tmp_path):
    from benchmarks.harness import write_sweep

    def report(rows):
        return " ".join(f"{r['model']}={r['v']}" for r in rows)

    write_sweep("some-sweep", [{"model": "a", "v": 1}, {"model": "b", "v": 1}], report, rerun=False, quick=False, out=tmp_path)
    result = write_sweep("some-sweep", [{"model": "b", "v": 2}, {"model": "c", "v": 2}], report, rerun=True, quick=False,
                         out=tmp_path)
    assert result["markdown"] == "a=1 b=2 c=2" == (tmp_path / "some_sweep.md").read_text().strip()
    assert [r["model"] for r in json.loads((tmp_path / "some_sweep.json").read_text())["rows"]] == ["a", "b", "c"]


def test_build_coverage_reports_a_child_that_dies_as_a_row():
    from benchmarks.build_coverage import row

    result = row("no_such_model", timeout=120)
    assert result["ok"] == "no" and "child died" in result["error"] and "no_such_model" in result["error"]


def test_build_time_builds_both_ways_and_compares_their_outputs_bit_for_bit(tmp_path):
    from benchmarks.build_time import run

    result = run(quick=True, out=tmp_path)
    (row,) = result["rows"]
    assert row["model"] == "squeezenet1_1" and row["bitwise_equal"] == "yes"
    assert row["foldconstant_s"] > 0 and row["numpy_fold_s"] > 0 and (tmp_path / "build_time_quick.md").exists()


def test_realized_cut_comes_from_paired_samples():
    """The realized cut reads the pruned/dense ratio of back-to-back samples (dense-pruned-dense),
    not the ratio of two rows' medians timed apart; the latter is kept beside it."""
    from benchmarks.real_models import _ratios, paired_ratio

    dense_times = iter([10.0, 12.0])
    assert paired_ratio(lambda: next(dense_times), lambda: 5.5) == 0.5   # 5.5 / mean(10, 12)
    dense = {"variant": "dense", "squeezer_ms": 10.0, "macs": 100, "flagged": False}
    pruned = {"variant": "pruned", "squeezer_ms": 8.0, "macs": 50, "flagged": False, "paired_ratio": 0.55}
    _ratios([dense, pruned])
    assert pruned["realized_cut"] == pytest.approx(0.9) and pruned["realized_cut_of_medians"] == pytest.approx(0.4)
    del pruned["paired_ratio"]
    _ratios([dense, pruned])
    assert pruned["realized_cut"] == pytest.approx(0.4)


def test_openvino_falls_back_to_the_onnx_export_and_says_so(tmp_path, monkeypatch):
    """OpenVINO's torch frontend fails on vit_b_16; the suite converts the ONNX export instead,
    and a row whose every source fails records each reason (never a stopped suite)."""
    from pathlib import Path

    from benchmarks import real_models

    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"")

    def fake_runner(source, x, threads):
        if not isinstance(source, Path):
            raise RuntimeError("Couldn't get TorchScript module by tracing")
        return lambda: "ran"

    monkeypatch.setattr(real_models, "_openvino_runner", fake_runner)
    row = {"notes": []}
    runner = real_models._first_openvino_runner([object(), onnx], None, 2, row)
    assert runner() == "ran" and "converted from the ONNX export (RuntimeError" in row["notes"][0]

    row = {"notes": []}
    assert real_models._first_openvino_runner([object(), tmp_path / "missing.onnx"], None, 2, row) is None
    assert row["notes"] == ["openvino: RuntimeError: Couldn't get TorchScript module by tracing"]


@pytest.mark.slow
def test_int8_speed_row_checks_numerics_and_times_every_backend(tmp_path):
    """One small conv through the int8 suite's row: the compiled int8 layer agrees with the
    fake-quantized torch model, and every backend that loads (ORT int8 always here; OpenVINO int8
    needs nncf, else a note) gets a time."""
    import torch
    from torch import nn

    from benchmarks import int8

    torch.manual_seed(0)
    row = int8._speed_row("conv", nn.Sequential(nn.Conv2d(16, 32, 3, padding=1)).eval(), torch.randn(1, 16, 12, 12),
                          quick=True, threads=1, tmp=tmp_path)
    assert row["quantized"] == "1 of 1" and row["err_vs_fake"] < 1e-5 and 0 < row["err_vs_float"] < 0.05
    assert row["int8_ms"] > 0 and row["fp32_ms"] > 0 and row["vs_fp32"] is not None
    assert row["ort_int8_ms"] is not None or row["notes"]
    assert row["openvino_int8_ms"] is not None or any("nncf" in n or "openvino" in n.lower() for n in row["notes"])


def _guard(probes):
    from benchmarks.contention import CALIBRATION, ContentionGuard

    feed = iter([100.0] * CALIBRATION + list(probes))
    return ContentionGuard(lambda: next(feed), sleep=lambda s: None)


def test_contention_guard_retakes_a_sample_beside_a_slow_probe():
    """A sample whose probe after it ran at half speed (a neighbour took a core) is taken again;
    one with quiet probes on both sides is kept as it is."""
    guard = _guard([100, 100, 100, 50, 100, 100])   # sample 1 quiet; sample 2 slow after, retaken
    times = iter([1.0, 9.0, 2.0])
    assert guard.sample(lambda: next(times)) == 1.0
    assert guard.sample(lambda: next(times)) == 2.0
    assert (guard.samples, guard.retaken, guard.unguarded) == (2, 1, 0)


def test_contention_guard_waits_for_quiet_and_keeps_the_last_try():
    """A slow probe before a sample delays it (the timer is not run); after TRIES slow samples
    the last is kept and counted, so a machine that stays slow is still timed."""
    from benchmarks.contention import TRIES

    guard = _guard([50, 50, 100, 100])
    calls = []
    assert guard.sample(lambda: calls.append(1) or 3.0) == 3.0 and len(calls) == 1
    slow = _guard([100, 50] * TRIES)
    values = iter(range(TRIES))
    assert slow.sample(lambda: float(next(values))) == TRIES - 1
    assert (slow.retaken, slow.unguarded) == (TRIES - 1, 1)
    assert slow.stats()["kept_slow"] == 1
