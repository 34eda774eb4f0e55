"""onnx2torch converters for opset-18/19 operators it lacks, registered through its own extension API.

onnx2torch 1.5.15 stops at opset 17 for three operators that torch's exporter (opset 18) and most recent graphs
use. `onnx.version_converter` cannot lower them (it has no Pad 18 -> 17 adapter), so each is registered here with
onnx2torch's `add_converter`, and each reuses onnx2torch's own module for the older version:

- `Reduce{Mean,Max,Min,Sum,Prod,L1,L2,LogSum,LogSumExp,SumSquare}`-18: `axes` moved from an attribute to an optional
  input. It must be a constant (initializer or Constant node); it becomes onnx2torch's static-axes reduction.
  An empty `axes` with `noop_with_empty_axes=1` is an identity.
- `Pad`-18/19: an optional `axes` input was added. Without it, this is Pad-13 and goes to onnx2torch's converter;
  with it, the graph is refused by name (not met in any graph this project imports).
- `Resize`-18/19: `antialias`, `keep_aspect_ratio_policy` and `axes` were added. With their defaults (no
  antialiasing, `stretch`, all axes) this is Resize-13 and goes to onnx2torch's converter; otherwise it is
  refused by name.

One more fix lets a converted network be exported to ONNX again (an imported twin's engine): onnx2torch reads
the exporter's opset from `torch.onnx.symbolic_helper`, where torch >= 2.9 no longer keeps it; `register` points
onnx2torch's symbolic_helper at the TorchScript exporter's globals, where the opset now lives.

- Operators whose opset 19, 20 or 21 versions only admit new tensor types (float8, int4, bool reductions;
  `Cast`'s `saturate` applies to float8 only): `Shape`, `Reshape`, `Cast`, `CastLike`, `Identity`, `Constant`,
  `Size`, `Equal`, `ConstantOfShape`, `IsNaN`, `IsInf`, `Flatten`, `Squeeze`, `Unsqueeze`, `Transpose`, and
  `Pad`-21, go to onnx2torch's converter for the version before (torch 2.14 exports opset 20 by default).
  `ReduceMax`/`ReduceMin`-20 are the opset-18 reductions. `AveragePool`-19 added `dilations`: without them (or
  all 1) it is the opset-11 pool, otherwise refused by name.

Anything else onnx2torch cannot convert stays its own `NotImplementedError`, which the importer reports.
"""

from __future__ import annotations

from functools import partial

from onnx2torch.node_converters.reduce import OnnxReduceStaticAxes
from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription, add_converter, get_converter
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxMapping, OperationConverterResult, get_const_value

REDUCTIONS_18 = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2",
                 "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")
OPSET_13_EQUIVALENT = {"Pad": (18, 19), "Resize": (18, 19)}
#: (operator, version) whose change from the version before only admits new tensor types
TYPES_ONLY = [(op, 19) for op in ("Shape", "Reshape", "Cast", "CastLike", "Identity", "Constant", "Size", "Equal")]
TYPES_ONLY += [(op, 20) for op in ("ConstantOfShape", "IsNaN", "IsInf")]
TYPES_ONLY += [(op, 21) for op in ("Shape", "Reshape", "Cast", "CastLike", "Identity", "Constant", "Size",
                                   "ConstantOfShape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Pad")]


class UnsupportedOnnxNode(NotImplementedError):
    """A node this extension recognises but cannot convert faithfully: names the node and why."""


def _reduce_18(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    keepdims = node.attributes.get("keepdims", 1)
    axes = None
    if len(node.input_values) > 1 and node.input_values[1]:
        try:
            axes = [int(a) for a in get_const_value(node.input_values[1], graph).tolist()]
        except KeyError as exc:
            raise UnsupportedOnnxNode(f"{node.operation_type} node {node.name!r}: axes are computed at run time, "
                                      f"not a constant") from exc
    if not axes and node.attributes.get("noop_with_empty_axes", 0):
        return _identity(node)
    return OperationConverterResult(
        torch_module=OnnxReduceStaticAxes(operation_type=node.operation_type, axes=axes, keepdims=keepdims),
        onnx_mapping=OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values),
    )


def _identity(node: OnnxNode) -> OperationConverterResult:
    from torch import nn

    return OperationConverterResult(
        torch_module=nn.Identity(), onnx_mapping=OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values)
    )


def _as_version_before(node: OnnxNode, graph: OnnxGraph, *, version: int) -> OperationConverterResult:
    """An operator whose `version` only admits new types: the converter of the version before."""
    return get_converter(node.operation_type, version - 1)(node, graph)


def _average_pool_19(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    if any(d != 1 for d in node.attributes.get("dilations", [])):
        raise UnsupportedOnnxNode(f"AveragePool node {node.name!r} uses dilations, which onnx2torch cannot express")
    return get_converter("AveragePool", 11)(node, graph)


def _as_opset_13(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    """Pad/Resize whose newer inputs and attributes hold their defaults: onnx2torch's opset-13 converter."""
    problems = []
    if node.operation_type == "Pad" and len(node.input_values) > 3 and node.input_values[3]:
        problems.append("an 'axes' input")
    if node.operation_type == "Resize":
        if node.attributes.get("antialias", 0):
            problems.append("antialias=1")
        if node.attributes.get("keep_aspect_ratio_policy", "stretch") != "stretch":
            problems.append(f"keep_aspect_ratio_policy={node.attributes['keep_aspect_ratio_policy']!r}")
        if node.attributes.get("axes") is not None:
            problems.append("an 'axes' attribute")
        if node.attributes.get("coordinate_transformation_mode") == "half_pixel_symmetric":
            problems.append("coordinate_transformation_mode='half_pixel_symmetric'")
    if problems:
        raise UnsupportedOnnxNode(f"{node.operation_type} node {node.name!r} uses {', '.join(problems)}, which "
                                  f"onnx2torch cannot express")
    return get_converter(node.operation_type, 13)(node, graph)


def _point_at_exporter_globals() -> None:
    from onnx2torch.utils import common

    if hasattr(common.symbolic_helper, "GLOBALS") or hasattr(common.symbolic_helper, "_export_onnx_opset_version"):
        return
    try:
        from torch.onnx._internal.torchscript_exporter import _globals
    except ImportError:  # an older torch keeps the opset where onnx2torch looks
        return
    common.symbolic_helper = _globals


def register() -> None:
    """Add the converters once (onnx2torch refuses a second registration of the same version)."""
    _point_at_exporter_globals()
    wanted = [(op, 18, _reduce_18) for op in REDUCTIONS_18]
    wanted += [(op, version, _as_opset_13) for op, versions in OPSET_13_EQUIVALENT.items() for version in versions]
    wanted += [(op, version, partial(_as_version_before, version=version)) for op, version in TYPES_ONLY]
    wanted += [("ReduceMax", 20, _reduce_18), ("ReduceMin", 20, _reduce_18), ("AveragePool", 19, _average_pool_19)]
    for operation_type, version, converter in wanted:
        if OperationDescription("", operation_type, version) not in _CONVERTER_REGISTRY:
            add_converter(operation_type=operation_type, version=version)(converter)


register()
