"""``import torchvision`` with the CPU build of torch.

PyPI's ``torchvision==0.28.0`` wheel is built against CUDA torch: with the CPU torch its C++ ops
(``_C.so``) do not load, and the import then fails in ``torchvision._meta_registrations``, which
registers fake kernels for ``torchvision::nms``/``qnms`` unconditionally (``operator
torchvision::nms does not exist``). The classification models use none of those ops, so we
define the two schemas and import. The ops stay unusable, loudly: ``torchvision.ops.nms`` raises
torchvision's "Couldn't load custom C++ ops", ``torch.ops.torchvision.nms`` torch's "no kernel".
Nothing in site-packages is touched."""

from __future__ import annotations

import sys
from types import ModuleType

import torch

# the schemas torchvision's C++ library would have registered (torchvision/csrc/ops/nms.cpp)
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library: torch.library.Library | None = None   # kept alive: the definitions die with it


def _define_missing_ops() -> None:
    global _library
    missing = [name for name in _SCHEMAS if not _op_exists(name)]
    if not missing:
        return
    if _library is None:
        _library = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        _library.define(_SCHEMAS[name])


def _op_exists(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def import_torchvision() -> ModuleType:
    """torchvision, importable with the CPU torch (see the module docstring)."""
    if "torchvision" in sys.modules and hasattr(sys.modules["torchvision"], "models"):
        return sys.modules["torchvision"]
    _define_missing_ops()
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]   # a failed import leaves half-initialized modules behind
    import torchvision

    return torchvision
