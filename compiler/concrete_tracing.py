"""Tracing that specializes on the example input: Python code that branches on, indexes with or
computes from *shapes* (``if H != self.window_size:``, ``grid = int(math.sqrt(T))``,
``self.position_ids[:, :seq_length]``) is run with the example's values, as NNI's concrete tracer
does, where plain ``torch.fx`` stops.

Every traced node carries its value on the example input (``node.meta["concrete"]``) and whether
it is *shape-only*: computed from tensors' sizes and Python constants alone. A shape-only value
used as a bool, an index, an int or a float takes the example's value, and the line is recorded;
``trace`` then guards the graph with the input shapes it was specialized for (a clear error at
run time). A value that depends on tensor *contents* still refuses, naming the line."""

from __future__ import annotations

import builtins
import math
import operator
import os
import traceback
from typing import Any

import torch
from torch import fx
from torch.fx._symbolic_trace import _orig_module_call

_TORCH_DIR = os.path.dirname(torch.__file__)
_SHAPE_ATTRS = ("shape", "ndim", "dtype", "device")
_SHAPE_METHODS = ("size", "dim", "numel", "nelement")
# functions of these modules on shape-only values stay shape-only
_CONSTANT_ATTRS = frozenset({"dtype"})
_PURE_MODULES = frozenset({operator.__name__, math.__name__, builtins.__name__, "_operator"})


class ConcreteProxy(fx.Proxy):
    """An fx Proxy that can give its value on the example input, where that value comes from
    shapes alone."""

    def __index__(self) -> int:
        return operator.index(self.tracer.shape_value(self, "used as an index"))

    def __int__(self) -> int:
        return int(self.tracer.shape_value(self, "converted to int"))

    def __float__(self) -> float:
        return float(self.tracer.shape_value(self, "converted to float"))

    def __getattr__(self, attr: str) -> Any:
        """A parameter's or buffer's dtype is a constant of the model (Hugging Face's ViT casts its
        input to ``projection.weight.dtype``): read it, keeping the weight out of the graph (a pass
        may replace the layer that holds it). A tensor's ``device.type`` is read too
        (``torch.autocast(device_type=x.device.type)`` needs a string); devices themselves stay in
        the graph, so it still follows its input and weights to another device."""
        if attr in _CONSTANT_ATTRS and self.node.op == "get_attr" and "concrete" in self.node.meta:
            return getattr(self.node.meta["concrete"], attr)
        if attr == "device":
            return self.tracer.create_proxy("call_function", getattr, (self, "device"), {})
        if attr == "type" and self.node.target is getattr and self.node.args[1:] == ("device",) \
                and isinstance(self.node.meta.get("concrete"), torch.device):
            return self.node.meta["concrete"].type
        return super().__getattr__(attr)

    def __setitem__(self, index: Any, value: Any) -> None:
        """``attn[:, :, i:, i:] = ...`` (MViTv2's relative positions): an in-place ``setitem`` node
        (torch.export makes it an ``index_put``); the example's value is updated the same way."""
        self.tracer.create_proxy("call_function", operator.setitem, (self, index, value), {})



class ShapeProxy(ConcreteProxy):
    """A shape-only proxy of a sequence (a ``torch.Size``, a tuple of sizes): ``len`` and
    iteration take the example's length (fx's own Proxy only unpacks)."""

    def __len__(self) -> int:
        return len(self.tracer.shape_value(self, "measured with len()"))

    def __iter__(self):
        return iter([self[i] for i in range(len(self))])


class IntProxy(ConcreteProxy, int):
    """A shape-only proxy whose value is an int: recorded in the graph where it reaches traced ops,
    and an ``int`` (the example's value) where it reaches code that needs one — torch's own
    argument parser, ``range``, slicing a real tensor (Hugging Face models size buffers so)."""

    def __new__(cls, node: fx.Node, tracer: Any, value: int) -> "IntProxy":
        return int.__new__(cls, value)

    def __init__(self, node: fx.Node, tracer: Any, value: int) -> None:
        ConcreteProxy.__init__(self, node, tracer)

    __hash__ = ConcreteProxy.__hash__
    # not a tensor-like to torch's argument parser (which then refuses it as an int): torch calls
    # on real tensors take the value; on traced ones, the traced tensor records the call
    __torch_function__ = torch._C._disabled_torch_function_impl


_TRACING_FILES = tuple(os.path.join("compiler", name) for name in ("tracing.py", "concrete_tracing.py"))


def model_line(frames: list[traceback.FrameSummary]) -> str:
    """``file:line (code)`` of the innermost of ``frames`` in the model's own code (outside torch
    and the tracer): where tracing stopped or specialized."""
    for frame in reversed(frames):
        if not frame.filename.startswith(_TORCH_DIR) and not frame.filename.endswith(_TRACING_FILES):
            return f"{frame.filename}:{frame.lineno} ({(frame.line or frame.name).strip()})"
    return "unknown location"


class ConcreteTracing:
    """Mixin for an ``fx.Tracer``: call ``start(root, inputs)`` (the example input of each
    parameter of ``forward``, by name) before ``trace``."""

    def start(self, root: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> None:
        self.concrete_root, self.concrete_inputs = root, inputs
        self.specialized: list[str] = []

    def proxy(self, node: fx.Node) -> fx.Proxy:
        value = node.meta.get("concrete")
        if node.meta.get("shape_only") and type(value) is int:
            return IntProxy(node, self, value)
        if node.meta.get("shape_only") and isinstance(value, (tuple, list)):
            return ShapeProxy(node, self)
        return ConcreteProxy(node, self)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if getattr(self, "concrete_inputs", None) is None or kind == "output":
            return node
        self._evaluating = True   # fx's patched Module.__getattr__ hands back real tensors meanwhile
        try:
            node.meta["concrete"] = self._evaluate(kind, target, args, kwargs)
        except Exception as exc:  # noqa: BLE001 - only an error if the value is needed
            node.meta["concrete_error"] = f"{type(exc).__name__}: {exc}"
        finally:
            self._evaluating = False
        node.meta["shape_only"] = _shape_only(kind, target, args, kwargs)
        return node

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if getattr(self, "_evaluating", False):   # a leaf evaluated on real tensors reads its real weights
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def to_bool(self, obj: fx.Proxy) -> bool:
        if obj.node.meta.get("shape_only"):
            return bool(self.shape_value(obj, "used in a condition"))
        return super().to_bool(obj)

    def shape_value(self, proxy: fx.Proxy, use: str) -> Any:
        """The example's value of a shape-only ``proxy`` (recording where it was specialized); a
        TraceError naming the line for a value computed from tensor contents."""
        node = proxy.node
        if not node.meta.get("shape_only") or "concrete" not in node.meta:
            why = node.meta.get("concrete_error", "it is computed from tensor values, not shapes")
            raise fx.proxy.TraceError(f"'{node.name}' is {use}, but {why}: data-dependent Python control flow "
                                      "cannot be captured in a graph")
        where = model_line(traceback.extract_stack())
        if where not in self.specialized:
            self.specialized.append(where)
        return node.meta["concrete"]

    def _evaluate(self, kind: str, target: Any, args: Any, kwargs: Any) -> Any:
        if kind == "placeholder":
            if target not in self.concrete_inputs:
                raise KeyError(f"no example value for input {target!r}")
            return self.concrete_inputs[target]
        if kind == "get_attr":
            value = self.concrete_root
            for part in target.split("."):
                value = getattr(value, part)
            return value
        args, kwargs = fx.node.map_arg((args, kwargs), _value)
        if kind == "call_function":
            return target(*args, **kwargs)
        if kind == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        if kind == "call_module":   # fx's patch of Module.__call__ bypassed: no nodes
            return _orig_module_call(self.concrete_root.get_submodule(target), *args, **kwargs)
        raise ValueError(kind)


def _value(node: fx.Node) -> Any:
    if "concrete" not in node.meta:
        raise ValueError(f"'{node.name}' has no value on the example input")
    return node.meta["concrete"]


def _shape_only(kind: str, target: Any, args: Any, kwargs: Any) -> bool:
    """Whether a node's value comes from sizes and constants alone."""
    proxies: list[fx.Node] = []
    fx.node.map_arg((args, kwargs), proxies.append)
    inputs_shape_only = all(p.meta.get("shape_only") for p in proxies)
    if kind == "call_method":
        return target in _SHAPE_METHODS or inputs_shape_only and bool(proxies)
    if kind != "call_function":
        return False
    if target is getattr:
        return len(args) > 1 and args[1] in _SHAPE_ATTRS or inputs_shape_only
    return inputs_shape_only and getattr(target, "__module__", None) in _PURE_MODULES
