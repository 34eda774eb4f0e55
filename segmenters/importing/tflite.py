"""TFLite -> ONNX through `tflite2onnx` (0.4.1), plus a small extension for the ops MediaPipe models need.

The converter is `tflite2onnx` (pure Python, reads the flatbuffer with the `tflite` package, writes ONNX opset 11,
IR version 6). It turns the NHWC TFLite graph into an NCHW ONNX graph: activations, the graph's input and its
output are transposed to NCHW and weights are permuted at conversion time (no Transpose nodes are inserted).
It folds MediaPipe's FP16 weight pattern (`FP16 constant -> DEQUANTIZE`) into FP32 initializers by itself.

Out of the box it refuses MediaPipe's selfie segmenter with `NotImplementedError: Unsupported TFLite OP: 117
HARD_SWISH!`, and would next refuse the custom op (`ValueError: Opcode 32 is not a TFLite builtin operator!`).
The extension below registers converters for exactly these through the converter's own registry,
`tflite2onnx.op.OpFactory.register` (keyed by TFLite builtin opcode; all custom ops share opcode 32 `CUSTOM`,
so one dispatcher picks the converter by the op's custom code). Every mapped op becomes standard ONNX (opset 11):

* `HARD_SWISH` (builtin 117), y = x * relu6(x + 3) / 6
  -> `HardSigmoid(x; alpha=1/6, beta=0.5)` followed by `Mul(x, that)`. (ONNX `HardSwish` needs opset 14;
  tflite2onnx writes opset 11, and `HardSigmoid` computes max(0, min(1, x/6 + 1/2)) = relu6(x + 3) / 6.)
  Elementwise, so it is layout-transparent: it works on the NCHW tensors the converter produces.

* custom `Convolution2DTransposeBias` (MediaPipe's transposed convolution with a bias; its kernel is
  `mediapipe/util/tflite/operations/transpose_conv_bias.cc`) -> one `ConvTranspose(X, W, B)`:
  - inputs: TFLite input 0 = X (NHWC -> NCHW), input 1 = W, input 2 = bias (1-D, one per output channel) -> `B`;
  - weight layout: TFLite stores W as OHWI (out channels, kH, kW, in channels); ONNX `ConvTranspose` wants
    (C_in, C_out / group, kH, kW) = IOHW, so W is permuted OHWI -> IOHW (perm 3, 0, 1, 2);
  - options: the op's custom options are the raw C struct `TfLiteTransposeConvParams` {int32 padding,
    int32 stride_width, int32 stride_height} (little-endian; padding 1 = SAME, 2 = VALID), not a flexbuffer;
    `strides` = [stride_height, stride_width], `group` = 1, `dilations` = [1, 1];
  - padding: the output size is TFLite's ComputeOutSize (SAME: in * stride; VALID: (in - 1) * stride + k), and
    must equal the output tensor's stored shape. The total crop per axis is (in - 1) * stride + k - out
    (never negative), split as TFLite does (ComputePaddingHeightWidth): begin = total // 2, end = total - begin,
    written as explicit `pads` = [top, left, bottom, right] (no `auto_pad`, no `output_shape`, no
    `output_padding`), so ONNX's out = stride * (in - 1) + k - begin - end reproduces TFLite's size exactly.
  MediaPipe's selfie segmenters use it once, as the last upsampling layer: 16 -> 1 channel, 2x2 kernel,
  stride 2, SAME, so the pads are all zero.

Any other custom op is refused by name. Nothing else in the converter is patched.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

from segmenters.files import atomic_write_bytes

__all__ = ["TFLiteConversionError", "MAPPED_OPS", "converter_version", "register_extension", "tflite_to_onnx"]

#: what the extension maps, for the record (also written into the ONNX model's doc_string)
MAPPED_OPS = {
    "HARD_SWISH": "HardSigmoid(alpha=1/6, beta=0.5) -> Mul(x, .)",
    "Convolution2DTransposeBias": "ConvTranspose(X, W OHWI->IOHW, B; strides=(sh, sw), explicit TFLite pads)",
}

class TFLiteConversionError(RuntimeError):
    """The TFLite file could not be turned into a valid ONNX graph; carries the converter's own message."""


def converter_version() -> str:
    import tflite2onnx

    return f"tflite2onnx {tflite2onnx.__version__} + patchwatch extension ({', '.join(MAPPED_OPS)})"


def transpose_conv_pads(in_size: int, kernel: int, stride: int, padding: str) -> tuple[int, int, int]:
    """(out, pad_begin, pad_end) of TFLite's transposed convolution along one axis."""
    if padding == "SAME":
        out = in_size * stride
    elif padding == "VALID":
        out = (in_size - 1) * stride + kernel
    else:
        raise TFLiteConversionError(f"unknown TFLite padding {padding!r}")
    total = max((in_size - 1) * stride + kernel - out, 0)
    return out, total // 2, total - total // 2


_registered = False


def register_extension() -> None:
    """Register the extension's converters with tflite2onnx's OpFactory (once per process)."""
    global _registered
    if _registered:
        return
    from tflite2onnx.op.common import OpFactory

    from segmenters.importing.tflite_ops import CONVERTERS

    for converter in CONVERTERS:
        existing = [OpFactory.registry[c] for c in converter.TypeMapping if c in OpFactory.registry]
        if any(getattr(e, "patchwatch_extension", False) for e in existing):
            continue  # registered by an earlier import of this module (reload)
        if existing:
            raise TFLiteConversionError(
                f"tflite2onnx already converts {list(converter.TypeMapping)} itself ({existing}); not shadowing it")
        converter.patchwatch_extension = True
        OpFactory.register(converter)
    _registered = True


def tflite_to_onnx(tflite_path: str | Path, onnx_path: str | Path) -> Path:
    """Convert `tflite_path` into a checked ONNX file written atomically at `onnx_path`."""
    try:
        import tflite
        import tflite2onnx
        from tflite2onnx.model import Model
    except ImportError as exc:
        raise TFLiteConversionError(
            f"converting TFLite needs the `tflite2onnx` and `tflite` packages ({exc}); "
            "pip install tflite2onnx==0.4.1 tflite") from exc
    tflite_path, onnx_path = Path(tflite_path), Path(onnx_path)
    buf = tflite_path.read_bytes()
    if buf[4:8] != b"TFL3":
        raise TFLiteConversionError(f"{tflite_path} is not a TFLite flatbuffer (no TFL3 identifier)")
    register_extension()
    # tflite2onnx warns about what is expected here (FP16 weights it folds, the empty roi/scales inputs of Resize-11)
    converter_log = logging.getLogger("tflite2onnx")
    level = converter_log.level
    converter_log.setLevel(logging.ERROR)
    try:
        converted = Model(tflite.Model.GetRootAsModel(buf, 0))
        converted.convert(dict())
    except (NotImplementedError, ValueError, AssertionError) as exc:
        raise TFLiteConversionError(f"tflite2onnx {tflite2onnx.__version__} failed on {tflite_path}: "
                                    f"{type(exc).__name__}: {exc}") from exc
    finally:
        converter_log.setLevel(level)
    model = converted.onnx
    model.producer_name = "tflite2onnx"
    model.producer_version = f"{tflite2onnx.__version__}+patchwatch"
    model.graph.name = tflite_path.stem
    model.doc_string = (f"converted from {tflite_path.name} by {converter_version()}; mapped: "
                        + "; ".join(f"{k} -> {v}" for k, v in MAPPED_OPS.items()))
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise TFLiteConversionError(f"the converted graph of {tflite_path} fails onnx.checker: {exc}") from exc
    return atomic_write_bytes(onnx_path, model.SerializeToString())
