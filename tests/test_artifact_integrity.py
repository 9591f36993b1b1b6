"""An exported module is covered whole by its digest, and export never pulls a file out from under
a reader (issue 17: an edited weight offset gave outputs off by 1e37 with no error; re-exporting
a loaded module rewrote its model.so in place)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

import codegen
import compiler
from passes import Sparsify
from squeezer import zoo


@pytest.fixture(scope="module")
def sparse_module():
    e = zoo.get("mlp")
    x = e.example_inputs(batch=1)
    g = Sparsify(sparsity=0.8)(compiler.trace(e.build(), x))
    return codegen.build(g, "llvm", sparse_kernels="sparse"), x


def _edits(manifest: dict):
    """One edit per region of the manifest: every top-level entry, a file hash, a weight offset."""
    yield "pipeline", lambda m: m["pipeline"].append("sparsify:sparsity=0.9")
    yield "inputs", lambda m: m["inputs"][0]["shape"].__setitem__(0, 2)
    yield "outputs", lambda m: m["outputs"][0]["shape"].__setitem__(-1, 11)
    yield "target", lambda m: m["target"].__setitem__("mcpu", "generic")
    yield "versions", lambda m: m["versions"].__setitem__("tvm", "0.0")
    layer = next(iter(manifest["weights"]["layers"]))
    stream = next(iter(manifest["weights"]["layers"][layer]["streams"]))
    yield "weight offset", lambda m: m["weights"]["layers"][layer]["streams"][stream].__setitem__(0, 4)
    yield "weight params", lambda m: m["weights"]["params"][0].__setitem__("shape", [1])
    yield "file hash", lambda m: m["files"]["model.so"].__setitem__("bytes", 1)
    yield "digest", lambda m: m.__setitem__("digest", "0" * 64)


def test_every_region_of_the_manifest_is_covered_by_the_digest(sparse_module, tmp_path):
    compiled, x = sparse_module
    d = compiled.export(tmp_path / "m")
    original = json.loads((d / "manifest.json").read_text())
    np.testing.assert_array_equal(codegen.load(d)(*x), compiled(*x))
    for region, edit in _edits(original):
        manifest = json.loads(json.dumps(original))
        edit(manifest)
        (d / "manifest.json").write_text(json.dumps(manifest, indent=2))
        with pytest.raises(compiler.ArtifactError, match="does not match its digest"):
            codegen.load(d)
    del original["digest"]   # an artifact without a digest is refused too
    (d / "manifest.json").write_text(json.dumps(original))
    with pytest.raises(compiler.ArtifactError, match="does not match its digest"):
        codegen.load(d)


def test_reexporting_a_loaded_module_into_its_own_directory_keeps_it_running(sparse_module, tmp_path):
    compiled, x = sparse_module
    d = compiled.export(tmp_path / "m")
    loaded = codegen.load(d)
    before = (d / "model.so").stat().st_ino
    loaded.export(d)                                 # model.so is replaced by a new file, not rewritten
    assert (d / "model.so").stat().st_ino != before
    np.testing.assert_array_equal(loaded(*x), compiled(*x))
    np.testing.assert_array_equal(codegen.load(d)(*x), compiled(*x))
    assert sorted(p.name for p in d.iterdir()) == ["manifest.json", "model.so", "weights.bin"]


def test_loads_during_repeated_exports_all_succeed(sparse_module, tmp_path):
    compiled, x = sparse_module
    d = compiled.export(tmp_path / "m")
    expected = compiled(*x)
    errors, stop = [], threading.Event()

    def exporter():
        while not stop.is_set():
            compiled.export(d)

    thread = threading.Thread(target=exporter)
    thread.start()
    try:
        for _ in range(15):
            try:
                np.testing.assert_array_equal(codegen.load(d)(*x), expected)
            except Exception as exc:  # noqa: BLE001 - collected and reported below
                errors.append(exc)
    finally:
        stop.set()
        thread.join()
    assert not errors, errors[:3]


def test_export_to_a_path_that_cannot_be_created_is_a_clear_error(sparse_module, tmp_path):
    compiled, _ = sparse_module
    (tmp_path / "file").write_text("")
    with pytest.raises(compiler.ArtifactError, match="could not create"):
        compiled.export(tmp_path / "file" / "m")
