"""The benchmark harness runs end to end on one small model (timings are not asserted: tests check
correctness, benchmarks check speed)."""

import json

from benchmarks import main


def test_compiled_vs_eager_quick_on_one_model(tmp_path):
    assert main(["compiled-vs-eager", "--quick", "--models", "mlp", "--out", str(tmp_path)]) == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert any(f.endswith(".json") for f in files) and any(f.endswith(".md") for f in files)
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    rows = data["rows"] if "rows" in data else data["results"]
    (row,) = rows
    assert row["model"] == "mlp" and row["max_abs_err"] <= 1e-4
    assert row["tvm_ms"] > 0 and row["eager_ms"] > 0


def test_pruning_accuracy_quick(tmp_path):
    assert main(["pruning-accuracy", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "pruning_accuracy_quick.json").read_text())
    assert [r["criterion"] for r in data["rows"]] == ["l1", "random"]
    assert all(0.45 < r["mac_cut"] < 0.7 and r["acc_finetuned"] > 0.9 for r in data["rows"])
