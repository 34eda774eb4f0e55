"""The tflite2onnx converters for what MediaPipe's segmenters use and tflite2onnx lacks (`MAPPED_OPS`).

Imported only when a TFLite file is converted (`register_extension`): tflite2onnx is an optional dependency.
"""

from __future__ import annotations

import struct

import tflite
from tflite2onnx.layout import Layout
from tflite2onnx.op.common import Operator

from segmenters.importing.tflite import TFLiteConversionError, transpose_conv_pads

_TFLITE_PADDING = {1: "SAME", 2: "VALID"}


def opcode_of(op_converter):
    op = op_converter.tflite
    return op_converter.model.OperatorCodes(op.OpcodeIndex()).BuiltinCode()


class _HardSigmoid(Operator):
    """Helper node in front of the HARD_SWISH `Mul` (not a TFLite op of its own)."""

    def __init__(self, TFactory):
        super().__init__(TFactory, -1)
        self.attrs["alpha"] = 1.0 / 6.0
        self.attrs["beta"] = 0.5
        self.setInited()

    @property
    def type(self):
        return "HardSigmoid"

    def propagatableTensors(self):
        return self.inputs + self.outputs

    def transform(self):
        pass


class HardSwish(Operator):
    """TFLite HARD_SWISH -> HardSigmoid + Mul."""

    TypeMapping = {tflite.BuiltinOperator.HARD_SWISH: "Mul"}

    def __init__(self, TFactory, index):
        super().__init__(TFactory, index)
        self.setInited()

    @property
    def type(self):
        return "Mul"

    def parse(self):
        op = self.tflite
        assert opcode_of(self) in self.TypeMapping
        assert op.InputsLength() == 1 and op.OutputsLength() == 1
        x = self.parseInput(0)
        y = self.parseOutput(0)
        gate = self.TFactory.getWithRef(x, f"PATCHWATCH_HardSwishGate_{y.name}", True)
        gate.setParsed()
        helper = _HardSigmoid(self.TFactory)
        helper.name = f"PATCHWATCH_HardSwishGate_{y.name}"
        helper.inputs.append(x)
        x.addConsumer(helper)
        helper.outputs.append(gate)
        gate.addProducer(helper)
        helper.setParsed()
        self.pre.append(helper)
        self.inputs.append(gate)
        gate.addConsumer(self)
        self.setParsed()

    def propagatableTensors(self):
        return self.inputs + self.outputs

    def transform(self):
        pass


class Convolution2DTransposeBias(Operator):
    """MediaPipe custom Convolution2DTransposeBias -> ConvTranspose with bias."""

    CUSTOM_CODE = "Convolution2DTransposeBias"

    def __init__(self, TFactory, index):
        super().__init__(TFactory, index)
        self.attrs["dilations"] = [1, 1]
        self.attrs["group"] = 1
        self.attrs["kernel_shape"] = []
        self.attrs["strides"] = []
        self.attrs["pads"] = [0, 0, 0, 0]
        self.setInited()

    @property
    def type(self):
        return "ConvTranspose"

    def parse(self):
        op = self.tflite
        assert op.InputsLength() == 3, "Convolution2DTransposeBias takes input, weights, bias"
        assert op.OutputsLength() == 1
        raw = op.CustomOptionsAsNumpy().tobytes() if op.CustomOptionsLength() else b""
        if len(raw) < 12:
            raise TFLiteConversionError(
                f"{self.CUSTOM_CODE}: expected a 12-byte TfLiteTransposeConvParams, got {len(raw)} bytes")
        padding_code, stride_w, stride_h = struct.unpack("<iii", raw[:12])
        padding = _TFLITE_PADDING.get(padding_code)
        if padding is None:
            raise TFLiteConversionError(f"{self.CUSTOM_CODE}: unknown padding code {padding_code}")

        x = self.parseInput(0, Layout("NHWC", "NCHW"))
        w = self.parseInput(1, Layout("OHWI", "IOHW"))
        self.parseInput(2, is_bias=True)
        y = self.parseOutput(0, Layout("NHWC", "NCHW"))

        kh, kw = w.shape[1:3]  # still the TFLite (OHWI) shape here: layouts are applied later
        out_h, top, bottom = transpose_conv_pads(x.shape[1], kh, stride_h, padding)
        out_w, left, right = transpose_conv_pads(x.shape[2], kw, stride_w, padding)
        if [out_h, out_w] != list(y.shape[1:3]) or w.shape[0] != y.shape[3] or w.shape[3] != x.shape[3]:
            raise TFLiteConversionError(
                f"{self.CUSTOM_CODE}: input {x.shape}, weights {w.shape} (OHWI), stride ({stride_h}, {stride_w}), "
                f"{padding} give ({out_h}, {out_w}), but the stored output is {y.shape}")
        self.attrs["kernel_shape"] = [kh, kw]
        self.attrs["strides"] = [stride_h, stride_w]
        self.attrs["pads"] = [top, left, bottom, right]
        self.setParsed()

    def propagatableTensors(self):
        return []

    def transform(self):
        pass


CUSTOM_CONVERTERS = {Convolution2DTransposeBias.CUSTOM_CODE: Convolution2DTransposeBias}


def custom_op(TFactory, index):
    """Dispatcher registered for opcode CUSTOM: picks the converter by the op's custom code."""
    op = TFactory.graph.Operators(index)
    code = TFactory.model.OperatorCodes(op.OpcodeIndex()).CustomCode()
    name = code.decode() if code else "<unnamed>"
    if name not in CUSTOM_CONVERTERS:
        raise NotImplementedError(
            f"Unsupported TFLite custom OP: {name!r} (the extension maps {sorted(CUSTOM_CONVERTERS)})")
    return CUSTOM_CONVERTERS[name](TFactory, index)


custom_op.TypeMapping = {tflite.BuiltinOperator.CUSTOM: "custom"}

#: what register_extension adds to tflite2onnx's OpFactory
CONVERTERS = (HardSwish, custom_op)
