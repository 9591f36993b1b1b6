"""Our CPU schedule rules hold on every kernel of the models we test: they schedule it or decline
it by returning None, never by raising. ``cpu.SafeRule`` turns a rule that raises into a silent
fall-through to dlight's rules (a debug log line), so a bug in one of ours would otherwise show
only as a slow kernel (it happened: a helper's typo sent every conv of an A/B to dlight)."""

import pytest
import torch
import tvm
from tiers import zoo_sweep

from codegen.schedules import default_cpu_rules
from squeezer import zoo
from test_cpu_schedule import fused_module

OUR_RULES = [safe.rule for safe in default_cpu_rules() if type(safe.rule).__module__.startswith("codegen.")]


def _apply_each_rule(model, inputs) -> int:
    mod, target = fused_module(model, inputs)
    mod = tvm.relax.transform.AttachAttrLayoutFreeBuffers()(mod)   # as the build schedules them
    kernels = 0
    for gv, func in mod.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        kernels += 1
        for rule in OUR_RULES:
            try:
                with target:
                    rule.apply(func, target, False)
            except Exception as exc:  # noqa: BLE001 - the test's point: name the rule and the kernel
                pytest.fail(f"{type(rule).__name__} raised on {gv.name_hint}: {exc}")
    return kernels


def test_the_rules_checked_are_ours():
    names = {type(r).__name__ for r in OUR_RULES}
    assert {"SpatialReductionRule", "ElementwiseRule", "RowReductionRule", "WinogradTransformRule"} <= names


@pytest.mark.parametrize("name", zoo_sweep(zoo.ZOO, quick=("concat", "depthwise-grouped")))
def test_our_rules_do_not_raise_on_the_zoo(name):
    e = zoo.get(name)
    assert _apply_each_rule(e.build(), e.example_inputs(batch=2)) > 0


@pytest.mark.parametrize("family", ["densenet", "regnet", "efficientnet", "shufflenetv2", "vit"])
def test_our_rules_do_not_raise_on_the_classification_families(family):
    from classification_families import FAMILIES

    torch.manual_seed(0)
    assert _apply_each_rule(FAMILIES[family]().eval(), (torch.randn(2, 3, 32, 32),)) > 0
