"""The squeezer command line, run as a user would (in-process for speed; the demo as a subprocess)."""

import json
import os
import subprocess
import sys
from unittest import mock

import pytest

from squeezer.cli import main


def test_inspect_zoo_model(capsys):
    assert main(["inspect", "lenet5"]) == 0
    out = capsys.readouterr().out
    assert "conv1" in out or "Conv2d" in out
    assert "total" in out


def test_inspect_json_of_a_factory(capsys):
    assert main(["inspect", "squeezer.zoo:MLPNet", "--input-shape", "2,64", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total"]["params"] > 0


def test_bad_model_and_shape_are_clear_errors(capsys):
    assert main(["inspect", "no.such.module:f", "--input-shape", "1,3"]) == 2
    assert "cannot import module 'no.such.module'" in capsys.readouterr().err
    assert main(["inspect", "squeezer.zoo:MLPNet", "--input-shape", "a,b"]) == 2
    assert "must be integers" in capsys.readouterr().err
    assert main(["inspect", "squeezer.zoo:MLPNet"]) == 2
    assert "--input-shape" in capsys.readouterr().err
    assert main(["compress", "mlp", "--pass", "no-such-pass", "--out", "x"]) == 2
    assert "unknown pass 'no-such-pass'" in capsys.readouterr().err


def test_compress_then_run(tmp_path, capsys):
    out = tmp_path / "mlp"
    assert main(["compress", "mlp", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["after"]["params"] == report["before"]["params"]
    assert (out / "manifest.json").exists()
    capsys.readouterr()
    assert main(["run", str(out), "--benchmark"]) == 0
    text = capsys.readouterr().out
    assert "output0: shape (1, 10)" in text and "median_ms" in text


def test_passes_lists_registry(capsys):
    from compiler import registered_passes

    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    names = list(registered_passes())
    assert all(name in out for name in names) if names else "no passes registered yet" in out


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    env = {**os.environ, "SQUEEZER_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "squeezer.cli", "demo", "--out", str(tmp_path / "demo"), "--quiet"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "baseline: trained" in first.stdout
    for row in ("test accuracy", "parameters", "MACs per image", "stored bytes", "latency, batch 1", "speedup vs eager"):
        assert row in first.stdout
    acc = [line for line in first.stdout.splitlines() if line.startswith("test accuracy")][0].split()
    torch_acc, compiled_acc = float(acc[4]), float(acc[6])
    # default job: channel pruning to half the MACs + distillation, within a point of the original
    assert torch_acc > 90 and compiled_acc >= torch_acc - 1.0
    macs = [line for line in first.stdout.splitlines() if line.startswith("MACs per image")][0].split()
    assert int(macs[4].replace(",", "")) <= 0.5 * int(macs[3].replace(",", ""))
    assert (tmp_path / "demo" / "manifest.json").exists()
    # a second run loads the baseline the first one cached instead of retraining it
    from squeezer.demo import baseline_model

    logged = []
    with mock.patch.dict(os.environ, {"SQUEEZER_CACHE": env["SQUEEZER_CACHE"]}):
        baseline_model(log=logged.append)
    assert len(logged) == 1 and logged[0].startswith("baseline: loaded")


@pytest.mark.slow
def test_compress_with_channel_pruning(tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["compress", "residual", "--pass", "channel-pruning:target_macs=0.5,round_to=4",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["after"]["macs"] <= 0.5 * report["before"]["macs"]
    assert report["passes"][0].startswith("channel-pruning:") and report["reports"][0]["changed"]
    capsys.readouterr()
    assert main(["run", str(out)]) == 0 and "output0: shape (1, 10)" in capsys.readouterr().out


def test_demo_variants_parse_and_conflict_with_pass(capsys):
    import compiler
    from squeezer.demo import VARIANTS

    for recipe in VARIANTS.values():   # every variant's passes round-trip through their specs
        assert recipe.passes and [compiler.parse_pass_spec(s) for s in recipe.specs()] == recipe.passes
    assert main(["demo", "--variant", "low-rank", "--pass", "channel-pruning"]) == 2
    assert "--variant or --pass" in capsys.readouterr().err


@pytest.mark.slow
def test_search_cli_writes_a_replayable_recipe(tmp_path, capsys):
    out = tmp_path / "search"
    assert main(["search", "--family", "bits", "--compression", "4", "--val", "100", "--rounds", "1",
                 "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "searched" in printed and (out / "recipe.txt").exists() and (out / "pareto.png").exists()
    recipe = (out / "recipe.txt").read_text().split()
    assert recipe and all(line.startswith("cluster:") for line in recipe)
    assert main(["search", "--speedup", "2", "--compression", "2"]) == 2
