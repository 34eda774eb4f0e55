"""Reduced precision, expressed in the ONNX graph itself.

TensorRT 11 removed the weak-typing builder flags (FP16, INT8 and the INT8 calibrator); TensorRT 10 accepts
the same strongly typed graphs. So precision is decided here, once, for every runtime:
- FP16: float tensors and weights become float16, with Resize (and the other ops onnxconverter-common keeps
  in float32) left in float32; inputs and outputs stay float32.
- INT8: explicit quantisation. ONNX Runtime's static quantiser calibrates activation ranges on real
  training images and writes QuantizeLinear/DequantizeLinear pairs around convolutions (symmetric,
  per-channel weights, as TensorRT's explicit quantisation expects).
Both graphs also run on ONNX Runtime's CPU provider, so the parity gate checks them on any machine.
"""

from __future__ import annotations

import io
import tempfile
from contextlib import redirect_stdout
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from export.onnx_export import INPUT_NAME, check_model, model_metadata, set_metadata

PRECISIONS = ("fp32", "fp16", "int8")


def convert_precision(
    proto: onnx.ModelProto, precision: str, calibration: Iterable[np.ndarray] | None = None
) -> onnx.ModelProto:
    """An fp32 patchwatch graph -> the same graph at `precision`, metadata updated.

    `calibration` (INT8 only): batches of normalised (N, 3, H, W) float32 real images.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    spec, current = model_metadata(proto)
    if current != "fp32":
        raise ValueError(f"convert from an fp32 graph, not from {current}")
    if precision == "fp32":
        return proto
    if precision == "fp16":
        converted = to_fp16(proto)
    else:
        if calibration is None:
            raise ValueError("INT8 needs calibration images")
        converted = to_int8(proto, calibration)
    set_metadata(converted, spec=spec, precision=precision)
    check_model(converted)
    return converted


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    from onnxconverter_common import float16

    with warnings.catch_warnings():
        # It warns for every weight below fp16's smallest normal; those become 1e-7, which is what we want.
        warnings.simplefilter("ignore")
        converted = float16.convert_float_to_float16(proto, keep_io_types=True)
    _outputs_back_to_float32(converted)
    return converted


def _outputs_back_to_float32(proto: onnx.ModelProto) -> None:
    """onnxconverter-common leaves an output float16 when its producer is a blocked op (Resize ends most
    segmentation heads); append a Cast so the engine contract, float32 logits, holds."""
    for output in proto.graph.output:
        if output.type.tensor_type.elem_type != TensorProto.FLOAT16:
            continue
        inner = output.name + "_fp16"
        for node in proto.graph.node:
            node.output[:] = [inner if name == output.name else name for name in node.output]
        proto.graph.node.append(helper.make_node("Cast", [inner], [output.name], to=TensorProto.FLOAT))
        output.type.tensor_type.elem_type = TensorProto.FLOAT


def to_int8(proto: onnx.ModelProto, calibration: Iterable[np.ndarray]) -> onnx.ModelProto:
    from onnxruntime.quantization import (
        CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches = [np.ascontiguousarray(b, dtype=np.float32) for b in calibration]
    if not batches:
        raise ValueError("INT8 calibration got no images")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._items = iter([{INPUT_NAME: image[None]} for batch in batches for image in batch])

        def get_next(self) -> dict | None:
            return next(self._items, None)

    with tempfile.TemporaryDirectory(prefix="patchwatch-int8-") as tmp:
        source, prepared, quantised = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        onnx.save(proto, str(source))
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()):  # the calibrator prints its progress
            warnings.simplefilter("ignore")
            # Fold constants and infer shapes first, as ONNX Runtime's quantisation guide asks.
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            quantize_static(
                str(prepared),
                str(quantised),
                Reader(),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
                # Q/DQ on convolution inputs and weights only, where TensorRT places INT8 kernels and fuses
                # the rest; percentile ranges: on CamVid LR-ASPP they beat min-max (label agreement
                # 0.985 vs 0.975, mIoU vs twin 0.87 vs 0.79), where a few outliers waste the 8 bits.
                op_types_to_quantize=["Conv"],
                calibrate_method=CalibrationMethod.Percentile,
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "CalibPercentile": 99.99},
            )
        return onnx.load(str(quantised))
