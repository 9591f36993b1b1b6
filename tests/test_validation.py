"""Nonsense is refused before any work starts, with one line naming the value at fault (issue 17's
"silently accepted" list): NaN/inf options, a key given twice, an empty recipe, a negative
tolerance, benchmark(number=0), search goals <= 0, and the CLI's numeric flags."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import codegen
import compiler
from passes import ChannelPruning, LowRankSplit, Sparsify
from squeezer.cli import main
from squeezer.search import search


@pytest.mark.parametrize("make", [lambda v: ChannelPruning(ratio=v), lambda v: Sparsify(sparsity=v),
                                  lambda v: LowRankSplit(energy=v)])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_option_values_are_refused(make, value):
    with pytest.raises(compiler.OptionError, match="is invalid; allowed"):
        make(value)


@pytest.mark.parametrize("spec", ["channel-pruning:ratio=nan", "sparsify:sparsity=inf"])
def test_non_finite_option_values_in_specs_are_refused(spec):
    with pytest.raises(compiler.OptionError, match="is invalid"):
        compiler.parse_pass_spec(spec)


def test_an_option_given_twice_is_refused():
    with pytest.raises(compiler.OptionError, match="option 'ratio' is given twice"):
        compiler.parse_pass_spec("channel-pruning:ratio=0.25,ratio=0.75")


@pytest.mark.parametrize("text", ["", "\n# only a comment\n", "[]"])
def test_an_empty_recipe_is_refused(tmp_path, text):
    path = tmp_path / "recipe.txt"
    path.write_text(text)
    with pytest.raises(compiler.OptionError, match="holds no pass spec"):
        compiler.load_recipe(path)


@pytest.mark.parametrize("verify", [-1.0, math.nan, math.inf, {"sparsify": -0.5}])
def test_a_verify_tolerance_must_be_a_finite_number_at_least_zero(verify):
    with pytest.raises(compiler.OptionError, match="verify tolerance"):
        compiler.Pipeline([Sparsify(sparsity=0.5)], verify=verify)


@pytest.fixture(scope="module")
def small_module():
    x = torch.randn(1, 4)
    return codegen.build(compiler.trace(nn.Linear(4, 2).eval(), (x,)), "llvm"), x


@pytest.mark.parametrize("options", [{"number": 0}, {"repeat": 0}, {"number": -3}, {"min_repeat_ms": -1},
                                     {"number": 2.5}])
def test_benchmark_refuses_counts_below_one(options, small_module):
    compiled, x = small_module
    with pytest.raises(compiler.InputError, match=f"benchmark: {next(iter(options))}="):
        compiled.benchmark(x, **options)


@pytest.mark.parametrize("goal", [{"speedup": 0}, {"speedup": -2.0}, {"compression": math.nan},
                                  {"latency_budget_ms": 0.0}, {"size_budget_bytes": -1}, {"speedup": math.inf}])
def test_search_goals_must_be_positive_and_finite(goal):
    """A goal <= 0 can never be met: the search used to loop until it ran out of layers (a hang
    on larger models)."""
    g = compiler.trace(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval(), (torch.randn(1, 16),))
    with pytest.raises(compiler.OptionError, match=f"search: {next(iter(goal))}="):
        search(g, lambda m: 1.0, family_name="bits", **goal)


@pytest.mark.parametrize("argv, message", [
    (["compress", "residual", "--batch", "0", "--out", "o"], "argument --batch: 0 must be >= 1"),
    (["compress", "residual", "--batch", "-3", "--out", "o"], "argument --batch: -3 must be >= 1"),
    (["compress", "residual", "--verify", "-1", "--out", "o"], "argument --verify: -1 must be a finite number >= 0"),
    (["compress", "residual", "--verify", "nan", "--out", "o"], "argument --verify: nan must be"),
    (["tune", "residual", "--trials", "0"], "argument --trials: 0 must be >= 1"),
    (["tune", "residual", "--time-budget", "0"], "argument --time-budget: 0 must be a finite number > 0"),
    (["search", "--speedup", "0"], "argument --speedup: 0 must be a finite number > 0"),
    (["search", "--compression", "-2"], "argument --compression: -2 must be"),
    (["search", "--size-budget", "0"], "argument --size-budget: 0 must be >= 1"),
    (["demo", "--finetune", "-1"], "argument --finetune: -1 must be >= 0"),
])
def test_cli_numeric_flags_are_checked_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("options", [{"target": "tpu"}, {"target": "{bad json"}, {"sparse_kernels": "fast"},
                                     {"binary_kernels": "fast"}, {"default_schedules": "yes"}])
def test_a_bad_build_option_is_both_an_option_error_and_a_build_error(options):
    """Bad build options raised BuildError before they were checked in one place (BuildOptions);
    callers catching either class keep working."""
    g = compiler.trace(nn.Linear(4, 2).eval(), (torch.randn(1, 4),))
    with pytest.raises(compiler.BuildOptionError) as exc:
        codegen.build(g, **options)
    assert isinstance(exc.value, compiler.OptionError) and isinstance(exc.value, compiler.BuildError)


def test_bench_without_its_plugin_is_a_one_line_error(monkeypatch, capsys):
    import squeezer.cli as cli

    monkeypatch.setattr(cli, "_plugin_command", lambda name: None)
    assert main(["bench"]) == 2
    assert "squeezer.commands" in capsys.readouterr().err
