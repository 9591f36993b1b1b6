"""Issue 17's "a traceback where a one-line error belongs" and the CLI's data safety: what the
user names (a MODEL string, a recipe, a target, an --out directory, an input shape) is checked
before the work, and a bad one is one `squeezer <command>: error: ...` line with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import codegen
import compiler
from squeezer.cli import main
from squeezer.paths import out_dir


def _one_error_line(capsys, command: str) -> str:
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert "Traceback" not in captured.err and len(lines) == 1, captured.err
    assert lines[0].startswith(f"squeezer {command}: error: ")
    return lines[0]


def not_a_module() -> dict:
    return {"weights": [1, 2]}


def factory_that_fails() -> nn.Module:
    raise RuntimeError("checkpoint file missing\nsecond line of detail")


@pytest.mark.parametrize("spec, message", [
    ("os:path", "names a module, not an nn.Module or a factory"),
    ("math:sqrt", "is a function that needs arguments (x)"),
    (":foo", "expected 'package.module:factory' with both parts given"),
    ("torch.nn:", "expected 'package.module:factory' with both parts given"),
    ("torch.nn:Linear", "is a class that needs arguments (in_features, out_features)"),
    ("torch:float32", "names a dtype"),
    ("tests.test_model_io:not_a_module", "returned a dict, not a torch.nn.Module"),
    ("tests.test_model_io:factory_that_fails", "calling it raised RuntimeError: checkpoint file missing"),
    ("no.such.module:f", "cannot import module 'no.such.module'"),
    ("fixture_broken_import:f", "importing it raised ZeroDivisionError"),
    ("squeezer.zoo:NoSuchNet", "module 'squeezer.zoo' has no attribute 'NoSuchNet'"),
    ("squeezer.zoo:MLPNet.nope", "has no attribute 'MLPNet.nope'"),
])
def test_a_model_string_that_names_no_factory_is_one_line(spec, message, capsys, tmp_path, monkeypatch):
    broken = tmp_path / "tests_fixture" / "fixture_broken_import.py"
    broken.parent.mkdir()
    broken.write_text("x = 1 / 0\n")
    monkeypatch.syspath_prepend(str(broken.parent))
    assert main(["inspect", spec, "--input-shape", "1,4"]) == 2
    line = _one_error_line(capsys, "inspect")
    assert message in line and repr(spec) in line


def test_a_model_string_error_has_no_traceback_in_a_real_process():
    proc = subprocess.run([sys.executable, "-m", "squeezer.cli", "inspect", "torch.nn:Linear", "--input-shape", "1,4"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "squeezer inspect: error: model 'torch.nn:Linear' is a class that needs arguments (in_features, "
        "out_features); give a factory that takes none and returns an nn.Module"]


def test_a_dotted_factory_and_a_module_instance_are_models():
    from squeezer.models import load_model

    assert isinstance(load_model("squeezer.zoo:MLPNet"), nn.Module)
    assert isinstance(load_model("torch.nn:ReLU"), nn.ReLU)       # a class that needs no argument


# ---- a model that fails on its example input -------------------------------------------------

def test_a_wrong_input_shape_is_one_line_naming_model_shape_node_and_torch_message(capsys):
    from squeezer.zoo import MLPNet

    with pytest.raises(compiler.ModelRunError) as info:
        compiler.trace(MLPNet().eval(), (torch.randn(1, 5),))
    text = str(info.value)
    assert "\n" not in text
    assert text == ("model MLPNet fails on its example input(s) [(1, 5) float32]: node 'fc_in' (Linear 'fc_in') "
                    "failed: RuntimeError: mat1 and mat2 shapes cannot be multiplied (1x5 and 64x128)")
    assert isinstance(info.value, compiler.TraceError) and isinstance(info.value.__cause__, RuntimeError)
    assert capsys.readouterr().err == ""            # fx's ShapeProp printed torch's traceback here


def test_a_function_node_that_fails_is_named():
    class Reshaper(nn.Module):
        def forward(self, x):
            return x.view(3, -1) + 1

    with pytest.raises(compiler.ModelRunError, match=r"\[\(1, 4\) float32\]: node 'view' \(view\) failed: RuntimeError"):
        compiler.trace(Reshaper(), (torch.randn(1, 4),))


def test_cli_wrong_input_shape_is_one_line(capsys):
    assert main(["inspect", "lenet5", "--input-shape", "1,2,32,32"]) == 2
    line = _one_error_line(capsys, "inspect")
    assert "model LeNet5 fails on its example input(s) [(1, 2, 32, 32) float32]: node 'conv1'" in line
    assert "expected input[1, 2, 32, 32] to have 1 channels, but got 2 channels instead" in line


# ---- a binary recipe ----------------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", b"channel-pruning\x00\x00"])
def test_a_binary_recipe_is_one_line(tmp_path, content, capsys):
    recipe = tmp_path / "recipe.bin"
    recipe.write_bytes(content)
    with pytest.raises(compiler.OptionError, match="not a text file"):
        compiler.load_recipe(recipe)
    assert main(["compress", "mlp", "--recipe", str(recipe), "--out", str(tmp_path / "out")]) == 2
    assert f"recipe {recipe}: not a text file" in _one_error_line(capsys, "compress")
    assert not (tmp_path / "out").exists()


# ---- an unknown CPU in the target ---------------------------------------------------------------

@pytest.mark.parametrize("target", [{"kind": "llvm", "mcpu": "foo"}, '{"kind": "llvm", "mcpu": "foo"}', "llvm -mcpu=foo",
                                    {"kind": "cuda", "arch": "sm_90", "host": {"kind": "llvm", "mcpu": "foo"}}])
def test_an_unknown_mcpu_is_refused_before_building(target):
    with pytest.raises(compiler.BuildOptionError, match="target mcpu 'foo' is not a CPU LLVM knows for mtriple"):
        codegen.resolve_target(target)


def test_an_mcpu_typo_gets_suggestions_and_a_bad_triple_is_named():
    with pytest.raises(compiler.BuildOptionError, match="did you mean skylake-avx512"):
        codegen.resolve_target({"kind": "llvm", "mcpu": "skylake-avx51"})
    with pytest.raises(compiler.BuildOptionError, match="mtriple 'nonsense' is not a triple LLVM builds for"):
        codegen.resolve_target({"kind": "llvm", "mcpu": "generic", "mtriple": "nonsense"})


def test_known_cpus_and_the_flag_form_resolve():
    t = codegen.resolve_target("llvm -mcpu=skylake -num-cores=3 -mattr=+avx2,+fma")
    assert (str(t.attrs["mcpu"]), int(t.attrs["num-cores"]), list(t.attrs["mattr"])) == ("skylake", 3, ["+avx2", "+fma"])
    arm = codegen.resolve_target({"kind": "llvm", "mcpu": "cortex-a72", "mtriple": "aarch64-linux-gnu"})
    assert str(arm.attrs["mcpu"]) == "cortex-a72"
    with pytest.raises(compiler.BuildOptionError, match="'-mcpu' is not of the form -key=value"):
        codegen.resolve_target("llvm -mcpu")


def test_cli_unknown_mcpu_is_one_line_and_nothing_is_written(tmp_path, capsys):
    out = tmp_path / "never" / "made"
    assert main(["compress", "mlp", "--target", "llvm -mcpu=foo", "--out", str(out)]) == 2
    assert "target mcpu 'foo'" in _one_error_line(capsys, "compress")
    assert not (tmp_path / "never").exists()


# ---- compress --out: the user's files are not overwritten ----------------------------------------

def test_compress_refuses_a_non_empty_directory_that_is_not_an_export(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    (mine / "report.json").write_text('{"mine": true}')
    assert main(["compress", "mlp", "--out", str(mine)]) == 2
    line = _one_error_line(capsys, "compress")
    assert "is a non-empty directory that is not a Squeezer export (its report.json would be overwritten)" in line
    assert "--force" in line
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt", "report.json"]
    assert (mine / "report.json").read_text() == '{"mine": true}'


def test_compress_force_writes_beside_the_users_files(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    assert main(["compress", "mlp", "--out", str(mine), "--force"]) == 0
    assert (mine / "notes.txt").read_text() == "my notes"
    assert {"model.so", "manifest.json", "report.json"} <= {p.name for p in mine.iterdir()}
    codegen.load(mine)
    capsys.readouterr()


def test_what_counts_as_a_previous_export(tmp_path):
    """A directory whose manifest.json has a squeezer-module/* format is ours (replaced); a
    manifest.json of anything else, or none, is the user's."""
    ours, theirs, empty = tmp_path / "ours", tmp_path / "theirs", tmp_path / "empty"
    for d in (ours, theirs, empty):
        d.mkdir()
    (ours / "manifest.json").write_text(json.dumps({"format": "squeezer-module/1"}))
    (ours / "model.so").write_bytes(b"old")
    (theirs / "manifest.json").write_text(json.dumps({"name": "my web app"}))
    for d in (ours, empty):
        with out_dir(d, force=False) as p:
            assert p == d
    with pytest.raises(compiler.OptionError, match="its manifest.json would be overwritten"):
        with out_dir(theirs, force=False):
            pass
    with out_dir(theirs, force=True):
        pass


@pytest.mark.parametrize("make_bad", [
    lambda tmp: (tmp / "file").write_text("x") and tmp / "file" / "sub",          # a parent is a file
    lambda tmp: (tmp / "file2").write_text("x") and tmp / "file2",                 # --out is a file
])
def test_an_out_that_cannot_be_created_is_refused_before_the_build(tmp_path, make_bad, capsys, monkeypatch):
    import squeezer.models

    calls = []
    monkeypatch.setattr(squeezer.models, "load_model", lambda spec: calls.append(spec))
    out = make_bad(tmp_path)
    assert main(["compress", "mlp", "--out", str(out)]) == 2
    line = _one_error_line(capsys, "compress")
    assert f"--out {out}" in line and calls == []     # no model loaded, traced or built


def test_a_failed_compress_removes_the_directories_it_made(tmp_path, capsys):
    out = tmp_path / "a" / "b"
    assert main(["compress", "mlp", "--input-shape", "1,3", "--out", str(out)]) == 2
    assert "fails on its example input" in _one_error_line(capsys, "compress")
    assert not (tmp_path / "a").exists()


def test_a_missing_tuning_database_is_refused_before_the_build(tmp_path, capsys):
    assert main(["compress", "mlp", "--database", str(tmp_path / "nodb"), "--out", str(tmp_path / "o")]) == 2
    assert f"--database {tmp_path / 'nodb'} does not exist" in _one_error_line(capsys, "compress")
    assert not (tmp_path / "o").exists()


# ---- a manifest that disagrees with its library ---------------------------------------------------

@pytest.fixture(scope="module")
def sparse_export(tmp_path_factory):
    from passes import Sparsify

    x = torch.randn(2, 32)
    g = Sparsify(sparsity=0.5)(compiler.trace(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval(), (x,)))
    compiled = codegen.build(g, "llvm")
    assert compiled.weights is not None          # runtime weight parameters are part of the signature
    return compiled, x


def _rewrite_manifest(directory: Path, edit) -> None:
    """What a careful vandal does: edit the manifest and recompute its digest."""
    from codegen.artifact import manifest_digest

    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    manifest["digest"] = manifest_digest(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["inputs"][0].update(shape=[4, 32]), "the manifest's inputs are [input_1:float32(4, 32)], the library "
                                                     "was built for [input_1:float32(2, 32)]"),
    (lambda m: m["inputs"][0].update(dtype="float16"), "the manifest's inputs are [input_1:float16(2, 32)]"),
    (lambda m: m["outputs"].append({"name": "output1", "shape": [2, 8], "dtype": "float32"}), "the manifest's outputs"),
    (lambda m: m["outputs"][0].update(shape=[2, 9]), "the manifest's outputs are [output0:float32(2, 9)]"),
])
def test_a_manifest_rewritten_with_a_fresh_digest_is_checked_against_the_library(sparse_export, tmp_path, edit, message):
    compiled, x = sparse_export
    compiled.export(tmp_path)
    assert codegen.load(tmp_path)(x).shape == (2, 8)
    _rewrite_manifest(tmp_path, edit)
    with pytest.raises(compiler.ArtifactError) as info:
        codegen.load(tmp_path)
    assert "manifest.json disagrees with model.so: " in str(info.value) and message in str(info.value)


def test_a_library_without_a_signature_is_checked_by_its_parameter_count(tmp_path, monkeypatch):
    """Modules built before the signature existed still load; their manifest is held to main's arity."""
    import codegen.builder

    monkeypatch.setattr(codegen.builder, "_with_signature", lambda mod, signature: mod)
    x = torch.randn(1, 4)
    codegen.build(compiler.trace(nn.Linear(4, 2).eval(), (x,)), "llvm").export(tmp_path)
    assert codegen.load(tmp_path)(x).shape == (1, 2)
    _rewrite_manifest(tmp_path, lambda m: m["inputs"].append({"name": "extra", "shape": [1, 4], "dtype": "float32"}))
    with pytest.raises(compiler.ArtifactError, match=r"main takes 1 argument\(s\), the manifest lists 2"):
        codegen.load(tmp_path)


# ---- saving a (compressed) torch model ------------------------------------------------------------

def _variants():
    """A traced zoo model, channel-pruned, sparsified (CSR layers), binarized (packed bit layers),
    quantized for training (fake-quant layers with step sizes) and deployed int8 (integer layers)."""
    from passes import Binarize, ChannelPruning, Quantize, Sparsify
    from squeezer import zoo

    entry = zoo.ZOO["lenet5"]
    g = compiler.trace(entry.build(), entry.example_inputs(2))
    return {"traced": g, "pruned": ChannelPruning(ratio=0.5)(g), "sparse": Sparsify(sparsity=0.6)(g),
            "binarized": Binarize()(g), "int8-train": Quantize(stage="train")(g), "int8": Quantize()(g)}


@pytest.fixture(scope="module")
def variants():
    return _variants()


def _same_outputs(a: nn.Module, b: nn.Module, inputs) -> bool:
    with torch.no_grad():
        return torch.equal(a.eval()(*inputs), b.eval()(*inputs))


VARIANTS = ["traced", "pruned", "sparse", "binarized", "int8-train", "int8"]


@pytest.mark.parametrize("name", VARIANTS)
def test_torch_save_of_a_graph_module_round_trips(variants, name, tmp_path):
    """fx re-creates the graph's tracer with no arguments on load, and a forward annotated under
    ``from __future__ import annotations`` put a str into the generated code's globals."""
    g = variants[name]
    torch.save(g.module, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert _same_outputs(g.module, loaded, g.example_inputs)
    if name == "binarized":
        from compiler.ops.bitserial import BitConv2d, BitLinear
        assert any(isinstance(m, (BitConv2d, BitLinear)) for m in loaded.modules())


@pytest.mark.parametrize("name", VARIANTS)
def test_compiler_save_and_load_round_trip_without_pickle(variants, name, tmp_path):
    g = variants[name]
    path = compiler.save(g, tmp_path / "model.safetensors")
    with open(path, "rb") as f:
        assert b"pickle" not in f.read(64) and path.read_bytes()[8:9] == b"{"   # a safetensors header
    back = compiler.load(path)
    assert _same_outputs(g.module, back.module, g.example_inputs)
    assert back.history == g.history and [tuple(t.shape) for t in back.example_inputs] == [(2, 1, 28, 28)]
    assert [(n, type(m).__name__) for n, m in back.module.named_modules()] == \
        [(n, type(m).__name__) for n, m in g.module.named_modules()]
    before, after = g.module.state_dict(), back.module.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in back.module.parameters()] == [p.requires_grad for p in g.module.parameters()]
    torch.save(back.module, tmp_path / "again.pt")                     # still a normal GraphModule


def test_a_loaded_graph_is_fine_tunable_and_compilable(variants, tmp_path):
    from passes import Sparsify

    back = compiler.load(compiler.save(variants["traced"], tmp_path / "m.safetensors"))
    loss = back.module.train()(*back.example_inputs).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in back.module.parameters())
    x = back.example_inputs[0]
    compiled = codegen.build(Sparsify(sparsity=0.5)(back), "llvm")
    with torch.no_grad():
        expected = Sparsify(sparsity=0.5)(back).module.eval()(x).numpy()
    assert abs(compiled(x) - expected).max() < 1e-4


def _rewrite_structure(path: Path, edit) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    structure = json.loads(meta["structure"])
    edit(structure)
    save_file(tensors, str(path), metadata={**meta, "structure": json.dumps(structure)})


def _node(structure: dict, op: str) -> dict:
    return next(n for n in structure["graph"] if n["op"] == op)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["modules"][0].update({"class": "os:system"}), "module class 'os:system' is not in a trusted package"),
    (lambda s: s["modules"][0].update({"class": "subprocess:Popen"}), "is not in a trusted package"),
    (lambda s: s["modules"][0].update({"class": "torch.nn.functional:relu"}), "is not an nn.Module class"),
    (lambda s: _node(s, "call_function").update(target={"function": "builtins.eval"}),
     "call target 'builtins.eval' is not one this format allows"),
    (lambda s: _node(s, "call_function").update(target={"function": "torch.load"}), "call target 'torch.load'"),
    (lambda s: _node(s, "call_function").update(target={"function": "os.system"}), "call target 'os.system'"),
    (lambda s: _node(s, "call_function").update(op="call_method", target="__reduce__"), "is not allowed for a call_method"),
    (lambda s: s["graph"][1].update(args={"tuple": [{"node": "later"}]}), "refers to node 'later' before it is defined"),
    (lambda s: s.pop("modules"), "malformed structure (KeyError"),
])
def test_load_runs_no_code_from_the_file(variants, tmp_path, edit, message):
    path = compiler.save(variants["traced"], tmp_path / "m.safetensors")
    _rewrite_structure(path, edit)
    with pytest.raises(compiler.ArtifactError) as info:
        compiler.load(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_load_refuses_other_files_in_one_line(tmp_path, variants):
    torch.save(variants["traced"].module, tmp_path / "pickled.pt")
    with pytest.raises(compiler.ArtifactError, match="is not a safetensors file"):
        compiler.load(tmp_path / "pickled.pt")
    with pytest.raises(compiler.ArtifactError, match="does not exist"):
        compiler.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(compiler.ArtifactError, match="holds format None; this version reads 'squeezer-graph/1'"):
        compiler.load(tmp_path / "plain.safetensors")


class Gate(nn.Module):
    """A user's leaf module: its class lives outside the trusted packages."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width))
        self.mode = "soft"

    def forward(self, x):
        return x * torch.sigmoid(self.scale)


def test_user_leaf_classes_load_only_when_trusted_and_hooks_are_refused(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), Gate(4)).eval()
    g = compiler.trace(model, (torch.randn(1, 4),), leaf_modules=[Gate])
    path = compiler.save(g, tmp_path / "m.safetensors")
    with pytest.raises(compiler.ArtifactError, match=rf"'{Gate.__module__}:Gate' is not in a trusted package.*trust="):
        compiler.load(path)
    back = compiler.load(path, trust=[Gate.__module__ + "."])
    assert back.module.get_submodule("1").mode == "soft" and _same_outputs(g.module, back.module, g.example_inputs)
    g.module.get_submodule("0").register_forward_hook(lambda *a: None)
    with pytest.raises(compiler.ArtifactError, match="module '0' \\(Linear\\) has _forward_hooks"):
        compiler.save(g, tmp_path / "hooked.safetensors")
