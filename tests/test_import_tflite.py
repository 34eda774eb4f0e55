"""TFLite import: the converter extension on synthetic graphs, and MediaPipe's selfie segmenters end to end.

(a) A tiny TFLite model built here (HARD_SWISH then MediaPipe's custom Convolution2DTransposeBias, random weights)
    is converted, and onnxruntime's result is compared with torch (`hardswish`, `conv_transpose2d` + bias, cropped
    as TFLite pads) and, where LiteRT is installed, with the TFLite runtime itself (its XNNPACK delegate
    implements the MediaPipe op).
(b) The real chain: the mediapipe wheel fetched from the registry (skipped when it is unreachable), each selfie
    model converted and checked, and the ONNX graph compared with the original TFLite model under LiteRT on 24
    real images (VOC photos and crops, CamVid frames with the most pedestrians and crops around them).
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

tflite = pytest.importorskip("tflite", reason="TFLite import needs `tflite` and `tflite2onnx==0.4.1` (test extra)")
pytest.importorskip("tflite2onnx", reason="TFLite import needs `tflite2onnx==0.4.1` (test extra)")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from segmenters.importing.tflite import TFLiteConversionError, tflite_to_onnx, transpose_conv_pads  # noqa: E402


def _litert_interpreter(path):
    """LiteRT's interpreter with its default delegates (XNNPACK resolves Convolution2DTransposeBias), or a skip."""
    interpreter_module = pytest.importorskip(
        "ai_edge_litert.interpreter", reason="the TFLite reference runtime needs ai-edge-litert (test extra)")
    interpreter = interpreter_module.Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    return interpreter


def _tflite_run(interpreter, image_nhwc: np.ndarray) -> np.ndarray:
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], image_nhwc)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def _onnx_session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------- (a) synthetic graphs ----------------------------

def _tiny_tflite(x_shape, weights_ohwi, bias, stride, padding, out_shape) -> bytes:
    """input -> HARD_SWISH -> Convolution2DTransposeBias(weights OHWI, bias) -> output, as a TFLite flatbuffer."""
    import importlib

    import flatbuffers

    # the generated modules (builder functions), not the classes of the same names that `tflite` re-exports
    Buffer, Model, Operator, OperatorCode, SubGraph, Tensor = (
        importlib.import_module(f"tflite.{name}") for name in ("Buffer", "Model", "Operator", "OperatorCode",
                                                              "SubGraph", "Tensor"))

    b = flatbuffers.Builder(1024)

    def vector(start, items, prepend):
        start(b, len(items))
        for item in reversed(items):
            prepend(item)
        return b.EndVector()

    def ints(start, values):
        return vector(start, list(values), b.PrependInt32)

    def offsets(start, values):
        return vector(start, list(values), b.PrependUOffsetTRelative)

    def buffer(data: bytes):
        payload = b.CreateByteVector(data) if data else None
        Buffer.Start(b)
        if payload is not None:
            Buffer.AddData(b, payload)
        return Buffer.End(b)

    buffers = [buffer(b""), buffer(weights_ohwi.astype("<f4").tobytes()), buffer(bias.astype("<f4").tobytes())]

    def tensor(name, shape, buffer_index):
        name_offset, shape_offset = b.CreateString(name), ints(Tensor.StartShapeVector, shape)
        Tensor.Start(b)
        Tensor.AddShape(b, shape_offset)
        Tensor.AddType(b, tflite.TensorType.FLOAT32)
        Tensor.AddBuffer(b, buffer_index)
        Tensor.AddName(b, name_offset)
        return Tensor.End(b)

    tensors = [tensor("x", x_shape, 0), tensor("h", x_shape, 0), tensor("w", weights_ohwi.shape, 1),
               tensor("bias", bias.shape, 2), tensor("y", out_shape, 0)]

    def opcode(code, custom=None):
        custom_offset = b.CreateString(custom) if custom else None
        OperatorCode.Start(b)
        OperatorCode.AddDeprecatedBuiltinCode(b, code)
        OperatorCode.AddBuiltinCode(b, code)
        if custom_offset is not None:
            OperatorCode.AddCustomCode(b, custom_offset)
        OperatorCode.AddVersion(b, 1)
        return OperatorCode.End(b)

    codes = [opcode(tflite.BuiltinOperator.HARD_SWISH), opcode(tflite.BuiltinOperator.CUSTOM,
                                                               "Convolution2DTransposeBias")]

    def operator(code_index, inputs, outputs, custom_options=None):
        in_offset, out_offset = ints(Operator.StartInputsVector, inputs), ints(Operator.StartOutputsVector, outputs)
        options = b.CreateByteVector(custom_options) if custom_options else None
        Operator.Start(b)
        Operator.AddOpcodeIndex(b, code_index)
        Operator.AddInputs(b, in_offset)
        Operator.AddOutputs(b, out_offset)
        if options is not None:
            Operator.AddCustomOptions(b, options)
        return Operator.End(b)

    # TfLiteTransposeConvParams {padding (1 SAME, 2 VALID), stride_width, stride_height}, as MediaPipe writes it
    params = struct.pack("<iii", {"SAME": 1, "VALID": 2}[padding], stride[1], stride[0])
    operators = [operator(0, [0], [1]), operator(1, [1, 2, 3], [4], params)]

    tensors_offset = offsets(SubGraph.StartTensorsVector, tensors)
    inputs_offset, outputs_offset = ints(SubGraph.StartInputsVector, [0]), ints(SubGraph.StartOutputsVector, [4])
    operators_offset = offsets(SubGraph.StartOperatorsVector, operators)
    name = b.CreateString("main")
    SubGraph.Start(b)
    SubGraph.AddTensors(b, tensors_offset)
    SubGraph.AddInputs(b, inputs_offset)
    SubGraph.AddOutputs(b, outputs_offset)
    SubGraph.AddOperators(b, operators_offset)
    SubGraph.AddName(b, name)
    subgraph = SubGraph.End(b)

    codes_offset = offsets(Model.StartOperatorCodesVector, codes)
    subgraphs_offset = offsets(Model.StartSubgraphsVector, [subgraph])
    buffers_offset = offsets(Model.StartBuffersVector, buffers)
    description = b.CreateString("patchwatch synthetic Convolution2DTransposeBias")
    Model.Start(b)
    Model.AddVersion(b, 3)
    Model.AddOperatorCodes(b, codes_offset)
    Model.AddSubgraphs(b, subgraphs_offset)
    Model.AddDescription(b, description)
    Model.AddBuffers(b, buffers_offset)
    b.Finish(Model.End(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def _torch_reference(x_nhwc, weights_ohwi, bias, stride, padding):
    """hardswish, then conv_transpose2d + bias on the full (uncropped) output, cropped as TFLite pads."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).double()
    w = torch.from_numpy(weights_ohwi).permute(3, 0, 1, 2).double()  # OHWI -> (C_in, C_out, kH, kW)
    full = F.conv_transpose2d(F.hardswish(x), w, torch.from_numpy(bias).double(), stride=stride)
    # TFLite's transposed convolution (tflite::reference_ops::TransposeConv): out = in * stride (SAME) or
    # (in - 1) * stride + k (VALID); the full result is cropped by total // 2 at the start, the rest at the end
    (in_h, in_w), (kh, kw) = x.shape[2:], w.shape[2:]
    if padding == "SAME":
        out_h, out_w = in_h * stride[0], in_w * stride[1]
    else:
        out_h, out_w = (in_h - 1) * stride[0] + kh, (in_w - 1) * stride[1] + kw
    top, left = ((in_h - 1) * stride[0] + kh - out_h) // 2, ((in_w - 1) * stride[1] + kw - out_w) // 2
    return full[:, :, top:top + out_h, left:left + out_w].numpy()


# (H, W, C_in, C_out, kernel, stride, padding): zero, even and odd (asymmetric) TFLite crops, and VALID
CASES = [
    (4, 4, 16, 1, 2, 2, "SAME"),  # the selfie segmenters' own configuration: no crop
    (5, 7, 4, 3, 3, 2, "SAME"),  # crop 1 per axis: 0 before, 1 after
    (6, 6, 4, 2, 4, 2, "SAME"),  # crop 2: 1 before, 1 after
    (4, 5, 3, 2, 5, 2, "SAME"),  # crop 3: 1 before, 2 after
    (3, 5, 3, 2, 3, 1, "VALID"),
    (4, 3, 2, 3, 3, 3, "VALID"),
]


@pytest.mark.parametrize("h,w,c_in,c_out,k,s,padding", CASES)
def test_transpose_conv_bias_extension_matches_torch(tmp_path, h, w, c_in, c_out, k, s, padding):
    rng = np.random.default_rng(h * 100 + k * 10 + s)
    weights = rng.normal(size=(c_out, k, k, c_in)).astype(np.float32)
    bias = rng.normal(size=(c_out,)).astype(np.float32)
    x = rng.normal(scale=3.0, size=(1, h, w, c_in)).astype(np.float32)
    out_h, _, _ = transpose_conv_pads(h, k, s, padding)
    out_w, _, _ = transpose_conv_pads(w, k, s, padding)
    path = tmp_path / "tiny.tflite"
    path.write_bytes(_tiny_tflite(x.shape, weights, bias, (s, s), padding, (1, out_h, out_w, c_out)))

    onnx_path = tflite_to_onnx(path, tmp_path / "tiny.onnx")
    model = onnx.load(onnx_path)
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["HardSigmoid", "Mul", "ConvTranspose"]
    (deconv,) = [n for n in model.graph.node if n.op_type == "ConvTranspose"]
    assert len(deconv.input) == 3, "the bias must be ConvTranspose's B input"
    got = _onnx_session(onnx_path).run(None, {"x": x.transpose(0, 3, 1, 2)})[0]
    assert got.shape == (1, c_out, out_h, out_w)
    np.testing.assert_allclose(got, _torch_reference(x, weights, bias, (s, s), padding), rtol=1e-4, atol=1e-4)

    try:
        interpreter = _litert_interpreter(path)
    except pytest.skip.Exception:
        return  # the torch comparison above stands on its own
    original = _tflite_run(interpreter, x)
    np.testing.assert_allclose(got, original.transpose(0, 3, 1, 2), rtol=1e-4, atol=1e-4)


def test_unknown_custom_op_is_refused_by_name(tmp_path):
    weights, bias = np.ones((1, 2, 2, 1), np.float32), np.zeros(1, np.float32)
    data = _tiny_tflite((1, 2, 2, 1), weights, bias, (2, 2), "SAME", (1, 4, 4, 1))
    path = tmp_path / "other.tflite"
    path.write_bytes(data.replace(b"Convolution2DTransposeBias", b"Convolution2DTransposeXyzw"))
    with pytest.raises(TFLiteConversionError, match="Unsupported TFLite custom OP: 'Convolution2DTransposeXyzw'"):
        tflite_to_onnx(path, tmp_path / "other.onnx")
    assert not (tmp_path / "other.onnx").exists()


def test_not_a_tflite_file_is_refused(tmp_path):
    path = tmp_path / "junk.tflite"
    path.write_bytes(b"\0" * 64)
    with pytest.raises(TFLiteConversionError, match="not a TFLite flatbuffer"):
        tflite_to_onnx(path, tmp_path / "junk.onnx")


# ---------------------------------------------------------------- (b) MediaPipe's selfie segmenters ----------------

@pytest.fixture(scope="session")
def mediapipe_cache(request, tmp_path_factory):
    """Where the fetched wheel and its extracted models live: pytest's cache folder (.pytest_cache, git-ignored),
    or a temporary folder when the cache plugin is off."""
    cache = getattr(request.config, "cache", None)
    return cache.mkdir("mediapipe_wheel") if cache is not None else tmp_path_factory.mktemp("mediapipe_wheel")


def _fetch(cache, variant):
    from segmenters.importing.mediapipe import RegistryUnreachableError, fetch_selfie_tflite

    try:
        return fetch_selfie_tflite(cache, variant, timeout=15)
    except RegistryUnreachableError as exc:
        pytest.skip(f"the package registry is unreachable, mediapipe's wheel cannot be fetched: {exc}")


def test_import_specs_follow_mediapipes_own_graph(mediapipe_cache):
    """The sidecars' input convention is what the wheel's CPU graph feeds the models."""
    from segmenters.importing.mediapipe import (RegistryUnreachableError, fetch_selfie_graph, selfie_graph_options,
                                                selfie_spec_path)
    from segmenters.importing.spec import read_import_spec

    try:
        options = selfie_graph_options(fetch_selfie_graph(mediapipe_cache, timeout=15))
    except RegistryUnreachableError as exc:
        pytest.skip(f"the package registry is unreachable, mediapipe's wheel cannot be fetched: {exc}")
    for variant, graph in options.items():
        spec = read_import_spec(selfie_spec_path(variant))
        assert graph["activation"] == "NONE" and spec.output.kind == "foreground_probability"
        assert graph["keep_aspect_ratio"] is False and spec.input.fixed_size
        assert spec.input.size == graph["size"] and spec.input.value_range == graph["value_range"]
        assert spec.input.mean == (0, 0, 0) and spec.input.std == (1, 1, 1) and spec.input.channel_order == "rgb"
        assert [c.name for c in spec.classes] == ["background", "person"]
    assert options["general"]["size"] == (256, 256) and options["landscape"]["size"] == (144, 256)


def _parity_images(data_root) -> list[tuple[str, np.ndarray]]:
    """24 real RGB uint8 images: VOC photos, crops and a low-resolution copy; CamVid frames with the most
    pedestrian pixels, and crops around their largest pedestrian."""
    import cv2
    from PIL import Image

    def load(path):
        return np.asarray(Image.open(path).convert("RGB"))

    images = []
    for n in (1, 23, 114):
        photo = load(data_root / "fixtures" / "voc" / f"{n}_image.png")
        h, w = photo.shape[:2]
        images.append((f"voc/{n}", photo))
        images.append((f"voc/{n}:crop", photo[h // 5:h - h // 5, w // 4:w - w // 8]))
    for n in (1, 23):
        photo = load(data_root / "fixtures" / "voc" / f"{n}_image.png")
        small = cv2.resize(photo, (photo.shape[1] // 3, photo.shape[0] // 3), interpolation=cv2.INTER_AREA)
        images.append((f"voc/{n}:third", small))

    camvid = data_root / "camvid"
    counts = []
    for split in ("val", "train"):
        for annotation in sorted((camvid / f"{split}annot").glob("*.png")):
            counts.append((int((np.asarray(Image.open(annotation)) == 9).sum()), split, annotation.name))
    counts.sort(key=lambda item: (-item[0], item[1], item[2]))
    for _, split, name in counts[:8]:
        frame = load(camvid / split / name)
        images.append((f"camvid/{split}/{name}", frame))
        pedestrian = np.asarray(Image.open(camvid / f"{split}annot" / name)) == 9
        count, components = cv2.connectedComponents(pedestrian.astype(np.uint8))
        largest = 1 + int(np.bincount(components.reshape(-1))[1:].argmax())
        ys, xs = np.nonzero(components == largest)
        cy, cx, half = (ys.min() + ys.max()) // 2, (xs.min() + xs.max()) // 2, max(int(np.ptp(ys)), int(np.ptp(xs)), 24)
        top, left = max(cy - half, 0), max(cx - half, 0)
        images.append((f"camvid/{split}/{name}:person", frame[top:cy + half, left:cx + half]))
    return images


def _mediapipe_input(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """What MediaPipe's ImageToTensorCalculator makes: stretched to (h, w), RGB floats in [0, 1], NHWC."""
    import cv2

    resized = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return (resized.astype(np.float32) / 255.0)[None]


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.parametrize("variant", ["general", "landscape"])
def test_selfie_segmenter_onnx_matches_tflite_runtime(mediapipe_cache, data_root, tmp_path, variant):
    from segmenters.importing.mediapipe import VARIANTS, selfie_import_spec

    tflite_path = _fetch(mediapipe_cache, variant)
    spec = selfie_import_spec(variant)
    onnx_path = tflite_to_onnx(tflite_path, tmp_path / f"{tflite_path.stem}.onnx")
    model = onnx.load(onnx_path)
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for n in model.graph.node}
    assert "ConvTranspose" in ops and "HardSigmoid" in ops and not ops & {"DequantizeLinear", "Transpose"}

    size = VARIANTS[variant][1]
    (graph_input,), (graph_output,) = model.graph.input, model.graph.output
    dims = lambda value: [d.dim_value for d in value.type.tensor_type.shape.dim]  # noqa: E731
    assert graph_input.name == "input_1" and dims(graph_input) == [1, 3, *size]  # converted to NCHW
    assert graph_output.name == spec["output"]["name"] and dims(graph_output) == [1, 1, *size]

    session, interpreter = _onnx_session(onnx_path), _litert_interpreter(tflite_path)
    images = _parity_images(data_root)
    assert len(images) >= 20
    worst, agree, total, person = 0.0, 0, 0, 0
    for name, image in images:
        x = _mediapipe_input(image, size)
        original = _tflite_run(interpreter, x)[0, :, :, 0]
        ours = session.run(None, {"input_1": x.transpose(0, 3, 1, 2)})[0][0, 0]
        assert ours.min() >= 0.0 and ours.max() <= 1.0, f"{name}: not a probability"
        worst = max(worst, float(np.abs(ours - original).max()))
        agree += int(((ours > 0.5) == (original > 0.5)).sum())
        total += ours.size
        person += int((original > 0.5).sum())
    assert worst < 2e-3, f"max |p_onnx - p_tflite| = {worst:.2e} over {len(images)} images"
    assert agree / total >= 0.999, f"labels at 0.5 agree on {agree / total:.5%} of pixels"
    assert person > 0.01 * total, "the images should hold people for the comparison to mean something"


@pytest.mark.slow
@pytest.mark.data
def test_selfie_twin_matches_the_tflite_runtime_end_to_end(mediapipe_cache, data_root, tmp_path):
    """TFLite -> ONNX (tflite2onnx + extension) -> twin (onnx2torch, gated against ONNX Runtime): the twin's labels
    against LiteRT running Google's original file, on the 24 real images at the model's own input size."""
    import torch

    from export.imports import import_twin_gated
    from segmenters.importing.mediapipe import VARIANTS, selfie_spec_path

    tflite_path = _fetch(mediapipe_cache, "general")
    onnx_path = tflite_to_onnx(tflite_path, tmp_path / "selfie.onnx")
    result = import_twin_gated(onnx_path, selfie_spec_path("general"), tmp_path / "selfie.pt",
                               images=str(data_root / "fixtures" / "voc" / "*_image.png"), count=3, progress=False)
    assert result.report.passed and any("Sigmoid cut off" in note for note in result.source.notes)
    assert result.twin.spec.class_names == ["background", "person"] and result.twin.spec.arch == "imported/mediapipe_selfie"
    interpreter, size = _litert_interpreter(tflite_path), VARIANTS["general"][1]
    agree = total = person = 0
    for _, image in _parity_images(data_root):
        x = _mediapipe_input(image, size)
        original = _tflite_run(interpreter, x)[0, :, :, 0] > 0.5
        with torch.no_grad():
            ours = result.twin.labels(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))[0].numpy() == 1
        agree += int((ours == original).sum())
        total += ours.size
        person += int(original.sum())
    assert person > 0.05 * total  # people are there to be found
    assert agree / total >= 0.999, f"labels agree on {agree / total:.5%} of pixels"
