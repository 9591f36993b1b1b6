"""Pass / Pipeline / registry contracts, with small passes defined here."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import compiler
from compiler import Pass, Pipeline
from compiler.pass_infra import PassResult
from squeezer import zoo
from compiler.registry import _REGISTRY


@compiler.register_pass
@dataclass(frozen=True)
class ScaleHead(Pass):
    """Multiplies the last Linear's weight by ``factor`` (exact only when factor == 1)."""

    name = "test-scale-head"
    verify_tolerance = 1e-6
    factor: float = 1.0
    mode: str = "weight"
    layers: tuple[str, ...] = ()

    def validate(self):
        self.check_range("factor", 0.0, 10.0, lo_open=True)
        self.check_choice("mode", ["weight", "bias"])

    def run(self, graph, report):
        name, layer = [(n, m) for n, m in graph.module.named_modules() if isinstance(m, nn.Linear)][-1]
        with torch.no_grad():
            getattr(layer, self.mode).mul_(self.factor)
        report.change(f"{name}.{self.mode} *= {self.factor}")
        return graph


@compiler.register_pass
@dataclass(frozen=True)
class Explode(Pass):
    name = "test-explode"

    def run(self, graph, report):
        raise RuntimeError("boom")


def lenet_graph():
    e = zoo.get("lenet5")
    return compiler.trace(e.build(), e.example_inputs())


def test_options_validated_at_construction_naming_option_and_range():
    with pytest.raises(compiler.OptionError, match=r"test-scale-head: option 'factor'=0.0 .*\(0.0, 10.0\]"):
        ScaleHead(factor=0.0)
    with pytest.raises(compiler.OptionError, match=r"option 'mode'='both'.*one of \['weight', 'bias'\]"):
        ScaleHead(mode="both")
    with pytest.raises(compiler.OptionError, match="'factor'"):
        ScaleHead(factor="2")
    with pytest.raises(Exception):
        ScaleHead().factor = 3.0  # frozen


def test_pass_never_mutates_its_input_and_reports():
    g = lenet_graph()
    before = {k: v.clone() for k, v in g.module.state_dict().items()}
    g2 = ScaleHead(factor=2.0)(g)
    for k, v in g.module.state_dict().items():
        assert torch.equal(v, before[k])
    head = [m for m in g.module.modules() if isinstance(m, nn.Linear)][-1]
    head2 = [m for m in g2.module.modules() if isinstance(m, nn.Linear)][-1]
    assert torch.equal(head2.weight, head.weight * 2.0)
    assert g2.history == [ScaleHead(factor=2.0).spec()] and g.history == []
    assert g2.reports[-1].pass_name == "test-scale-head" and g2.reports[-1].changed


def test_registry_and_spec_round_trip():
    p = compiler.parse_pass_spec("test-scale-head:factor=2.5,mode=bias,layers=[fc1;fc2]")
    assert p == ScaleHead(factor=2.5, mode="bias", layers=("fc1", "fc2"))
    assert compiler.parse_pass_spec(p.spec()) == p
    assert compiler.get_pass("test-scale-head") is ScaleHead
    with pytest.raises(compiler.OptionError, match="unknown pass 'nope'"):
        compiler.parse_pass_spec("nope:ratio=1")
    with pytest.raises(compiler.OptionError, match="unknown option 'ratio'"):
        compiler.parse_pass_spec("test-scale-head:ratio=1")
    with pytest.raises(compiler.OptionError, match="not a valid float"):
        compiler.parse_pass_spec("test-scale-head:factor=big")
    with pytest.raises(compiler.OptionError, match="allowed"):
        compiler.parse_pass_spec("test-scale-head:factor=50")


def test_recipe_files(tmp_path):
    (tmp_path / "r.txt").write_text("# comment\ntest-scale-head:factor=1.0\n\ntest-scale-head:mode=bias\n")
    (tmp_path / "r.json").write_text('["test-scale-head:factor=3"]')
    assert compiler.load_recipe(tmp_path / "r.txt") == [ScaleHead(), ScaleHead(mode="bias")]
    assert compiler.load_recipe(tmp_path / "r.json") == [ScaleHead(factor=3.0)]


def test_recipe_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("test-scale-head:factor=1\n\ntest-scale-head:factor=99\n")
    with pytest.raises(compiler.OptionError, match=r"bad.txt, line 3: .*'factor'=99"):
        compiler.load_recipe(bad)
    (tmp_path / "bad.json").write_text('["test-scale-head", 3]')
    with pytest.raises(compiler.OptionError, match="list of strings"):
        compiler.load_recipe(tmp_path / "bad.json")
    with pytest.raises(compiler.OptionError, match="cannot read"):
        compiler.load_recipe(tmp_path / "missing.txt")


@compiler.register_pass
@dataclass(frozen=True)
class NeedsRatio(Pass):
    name = "test-needs-ratio"
    ratio: float


def test_required_option_missing_is_an_option_error():
    with pytest.raises(compiler.OptionError, match=r"required option\(s\) \['ratio'\]"):
        compiler.parse_pass_spec("test-needs-ratio")


def test_pass_names_must_be_kebab_case():
    @dataclass(frozen=True)
    class Bad(Pass):
        name = "Bad_Name"

    with pytest.raises(ValueError, match="kebab-case"):
        compiler.register_pass(Bad)
    assert "Bad_Name" not in _REGISTRY


def test_verification_catches_a_wrong_pass():
    g = lenet_graph()
    ok = Pipeline([ScaleHead(factor=1.0)], verify=True)(g)  # exact: passes
    assert ok.history
    with pytest.raises(compiler.VerificationError, match=r"pass 'test-scale-head' changed the outputs by .* tolerance is 1e-06"):
        Pipeline([ScaleHead(factor=1.0), ScaleHead(factor=3.0)], verify=True)(g)
    # a looser user tolerance per pass lets a lossy change through
    Pipeline([ScaleHead(factor=1.001)], verify={"test-scale-head": 10.0})(g)


def test_failing_pass_is_named_with_its_predecessors():
    with pytest.raises(compiler.PassError, match=r"pass 'test-explode' .*after passes \['test-scale-head'\].*boom"):
        Pipeline([ScaleHead(), Explode()])(lenet_graph())


def test_instruments_timing_and_dump(tmp_path):
    pipe = Pipeline([ScaleHead(), ScaleHead(mode="bias")], dump_dir=tmp_path)
    pipe(lenet_graph())
    assert [n for n, _ in pipe.timing.seconds] == ["test-scale-head", "test-scale-head"]
    dumps = sorted(p.name for p in tmp_path.iterdir())
    assert dumps == ["01-test-scale-head.txt", "02-test-scale-head.txt"]
    assert "def forward" in (tmp_path / dumps[0]).read_text()
    pipe(lenet_graph())  # a second run starts its counters afresh
    assert len(pipe.timing.seconds) == 2 and sorted(p.name for p in tmp_path.iterdir()) == dumps


def test_lossy_passes_are_reported_unchecked_and_instrument_failures_named():
    @dataclass(frozen=True)
    class LossyScale(ScaleHead):
        name = "test-lossy-scale"
        verify_tolerance = None

    verify = compiler.Verify()
    Pipeline([LossyScale(factor=2.0), ScaleHead()], instruments=[verify])(lenet_graph())
    assert verify.unchecked == ["test-lossy-scale"]
    assert [name for name, _ in verify.errors] == ["test-scale-head"]

    class Broken(compiler.Instrument):
        def after_pass(self, pass_, before, after, seconds):
            raise OSError("disk full")

    with pytest.raises(compiler.PassError, match="instrument Broken failed after pass 'test-scale-head'.*disk full"):
        Pipeline([ScaleHead()], instruments=[Broken()])(lenet_graph())


def test_pipeline_rejects_non_passes():
    with pytest.raises(TypeError, match="Pass objects"):
        Pipeline([lambda g: g])


@dataclass(frozen=True)
class Checked(Pass):
    """Records what its ``requires``/``ensures`` saw; changes nothing unless ``touch``."""

    name = "test-checked"
    reported = ("params", "macs")
    touch: bool = False
    refuse: bool = False

    def requires(self, graph):
        if self.refuse:
            raise compiler.PassError("test-checked: refused before copying")

    def run(self, graph, report):
        if self.touch:
            report.change("touched")
        return graph

    def ensures(self, before, after):
        assert before is not after and all("shape" in n.meta for n in after.nodes if n.op != "output")
        report_seen.append((before.history[:], after.history[:]))


report_seen: list = []


def test_apply_does_the_bookkeeping_once_and_says_whether_anything_changed(monkeypatch):
    g = lenet_graph()
    calls = []
    original = compiler.Graph.recompile
    monkeypatch.setattr(compiler.Graph, "recompile", lambda self: (calls.append(1), original(self))[1])
    result = Checked().apply(g)
    assert isinstance(result, PassResult) and not result.changed
    assert len(calls) == 1 and result.graph is not g and g.history == [] and g.reports == []
    # nothing changed: reported with the reason, and not recorded as applied (issue 17)
    assert result.graph.history == [] and result.graph.reports == [result.report]
    assert "the model has no layer it rewrites. test-checked was not applied" in result.report.unchanged
    total = compiler.summarize(g)
    assert result.report.before.total_macs == result.report.after.total_macs == total.total_macs
    assert result.report.stats == {"params": f"{total.total_params:,} -> {total.total_params:,}",
                                   "macs": f"{total.total_macs:,} -> {total.total_macs:,}"}
    assert report_seen[-1] == ([], [])   # ensures sees the recompiled graph before the spec is recorded
    touched = Checked(touch=True).apply(g)
    assert touched.changed and touched.graph.history == ["test-checked:touch=True"] and touched.report.unchanged is None
    assert isinstance(Checked()(g), compiler.Graph)   # calling a pass still returns the graph


def test_requires_refuses_before_anything_is_copied(monkeypatch):
    g = lenet_graph()
    monkeypatch.setattr(compiler.Graph, "copy", lambda self: pytest.fail("copied before requires"))
    with pytest.raises(compiler.PassError, match="refused before copying"):
        Checked(refuse=True)(g)


def test_pass_options_are_parsed_once_into_typed_values():
    from passes import ChannelPruning, LowRankSplit, Sparsify
    from passes.low_rank import RankRule

    p = ChannelPruning(overrides=("conv1=0.25", "fc*=0"))
    assert p.override_ratios == (("conv1", 0.25), ("fc*", 0.0))
    assert compiler.parse_pass_spec(p.spec()) == p
    lr = LowRankSplit(overrides=("fc1=rank:4", "conv*=skip"))
    assert lr.override_rules == (("fc1", RankRule("rank", 4)), ("conv*", RankRule("skip")))
    assert lr.rule_for("fc1") == RankRule("rank", 4) and compiler.parse_pass_spec(lr.spec()) == lr
    assert Sparsify(pattern="block", block="4x2").block_shape == (4, 2)
    with pytest.raises(compiler.OptionError, match="overrides"):
        ChannelPruning(overrides=("conv1=1.5",))


@pytest.mark.parametrize("first, second", [("sparsify:sparsity=0.8", "sparsify:sparsity=0.8"),
                                           ("cluster:bits=4", "sparsify:sparsity=0.5"),
                                           ("cluster:bits=4", "cluster:bits=4")])
def test_a_pass_with_nothing_to_do_is_not_recorded_as_applied(first, second):
    """A second pass over layers that are compressed already changes nothing: its report says why,
    and neither the history nor (through it) the exported manifest lists it as applied."""
    from squeezer import zoo

    e = zoo.get("mlp")
    g = compiler.trace(e.build(), e.example_inputs(batch=1))
    result = compiler.parse_pass_spec(second).apply(compiler.parse_pass_spec(first)(g))
    assert not result.changed and result.graph.history == [first]
    assert "compressed already: fc_in" in result.report.unchanged
    assert result.report.to_dict()["unchanged"] == result.report.unchanged
    assert "no change: " in str(result.report)
