"""Export: every zoo model to ONNX with its spec, engines behind one interface, the parity gate that can fail,
reduced-precision graphs, and TensorRT (skipped, with the reason, where it cannot run)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from export import (
    EngineError, EngineInputError, OnnxRuntimeEngine, ParityError, ParityTolerance, TorchEngine, export_onnx, gate,
    load_engine, model_metadata, parity_check, parity_images, prepare_images,
)
from export.pipeline import export_onnx_gated, ParitySettings, precision_path, read_parity
from export.precision import convert_precision
from export.tensorrt_engine import PlanTarget, tensorrt_missing_reason
from segmenters.data import dataset_classes
from segmenters.data.common import read_rgb
from segmenters.models import MODELS, build_model
from segmenters.spec import ModelSpec
from segmenters.twin import Twin, save_twin


@pytest.fixture(scope="module")
def gated_unet(tmp_path_factory, camvid_unet):
    """The trained CamVid U-Net exported through the gate at fp32 and fp16."""
    checkpoint, twin = camvid_unet
    out = tmp_path_factory.mktemp("export") / "unet.onnx"
    reports = export_onnx_gated(checkpoint, out, precisions=("fp16",), settings=ParitySettings(count=8),
                                progress=False)
    return out, twin, reports


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_every_zoo_model_exports_with_spec_and_passes_fp32_parity(arch, tmp_path, data_root):
    torch.manual_seed(0)
    spec = ModelSpec(arch=arch, classes=dataset_classes("camvid"), input_size=(64, 96), dataset="camvid")
    checkpoint = tmp_path / f"{arch}.pt"
    spec = save_twin(checkpoint, build_model(arch, spec.num_classes), spec)
    reports = export_onnx_gated(checkpoint, tmp_path / f"{arch}.onnx", settings=ParitySettings(count=4),
                                progress=False)
    report = reports["fp32"]
    assert report.passed and report.images == 4 and report.pixels == 4 * 64 * 96
    proto = onnx.load(str(tmp_path / f"{arch}.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert model_metadata(proto) == (spec, "fp32")
    # Dynamic batch, height and width: a shape never traced, odd sizes included.
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    x = np.random.default_rng(1).standard_normal((2, 3, 70, 101)).astype(np.float32)
    engine, twin = OnnxRuntimeEngine(tmp_path / f"{arch}.onnx"), TorchEngine(Twin(build_model(arch, 11), spec))
    twin.model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    ref = twin.infer(x)
    assert engine.infer(x).shape == ref.shape == (2, 11, 70, 101)
    assert np.abs(engine.infer(x) - ref).max() <= 1e-4 * (ref.max() - ref.min())


@pytest.mark.data
def test_gated_export_writes_reports_for_each_precision(gated_unet):
    out, twin, reports = gated_unet
    assert set(reports) == {"fp32", "fp16"}
    for precision, report in reports.items():
        path = precision_path(out, precision)
        assert path.is_file() and read_parity(path) == report
        assert report.passed, report.text()
        assert (out.parent / f"{path.name}.parity.png").is_file()
        engine = OnnxRuntimeEngine(path)
        assert engine.precision == precision and engine.spec == twin.spec
    assert reports["fp32"].label_agreement >= 0.9999 and reports["fp32"].miou >= 0.999
    assert isinstance(load_engine(out), OnnxRuntimeEngine)
    with pytest.raises(EngineError, match="unknown engine file type"):
        load_engine(out.with_suffix(".pt"))
    fp16 = onnx.load(str(precision_path(out, "fp16")))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in fp16.graph.initializer)
    _assert_float32_io(fp16)


def _assert_float32_io(graph: onnx.ModelProto) -> None:
    """The engine contract holds at every precision: float32 images in, float32 logits out."""
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


@pytest.mark.data
def test_int8_graph_is_explicitly_quantised_for_tensorrt_and_gated(gated_unet):
    out, twin, _ = gated_unet
    reference = TorchEngine(twin)
    calibration = [reference.prepare(image) for _, image in
                   parity_images("camvid", 8, size=twin.spec.input_size, split="train")]
    int8 = convert_precision(onnx.load(str(out)), "int8", calibration)
    _assert_float32_io(int8)
    quantise = [n for n in int8.graph.node if n.op_type == "QuantizeLinear"]
    convs = [n for n in int8.graph.node if n.op_type == "Conv"]
    assert len(quantise) >= len(convs) > 0
    # TensorRT's explicit quantisation: symmetric int8, every zero point 0.
    initialisers = {t.name: numpy_helper.to_array(t) for t in int8.graph.initializer}
    for node in quantise:
        zero_point = initialisers[node.input[2]]
        assert zero_point.dtype == np.int8 and not zero_point.any()
    report = parity_check(OnnxRuntimeEngine(int8), reference, parity_images("camvid", 4, size=twin.spec.input_size))
    assert report.precision == "int8" and report.tolerance.miou < 0.999  # judged by int8's own tolerance
    assert 0.5 < report.label_agreement <= 1.0 and report.max_abs > 0


@pytest.mark.data
def test_parity_gate_fails_on_a_perturbed_onnx(gated_unet, tmp_path):
    out, twin, _ = gated_unet
    proto = onnx.load(str(out))
    # Nudge the classifier's bias for one class: small in absolute terms, enough to move labels.
    bias = next(t for t in proto.graph.initializer if "classifier.bias" in t.name)
    values = numpy_helper.to_array(bias).copy()
    values[int(np.argmax(values))] -= 0.5
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    images = parity_images("camvid", 6, size=twin.spec.input_size)
    report = parity_check(OnnxRuntimeEngine(proto), TorchEngine(twin), images, panel_path=tmp_path / "worst.png")
    assert not report.passed
    assert report.max_abs >= 0.4 and any("max |dlogit|" in f for f in report.failures)
    with pytest.raises(ParityError, match="parity FAIL") as caught:
        gate(report)
    assert caught.value.report is report
    assert (tmp_path / "worst.png").is_file()
    # The unperturbed graph passes on the same images.
    assert parity_check(OnnxRuntimeEngine(out), TorchEngine(twin), images).passed


@pytest.mark.data
def test_export_over_tolerance_keeps_the_report_and_deletes_the_engine(camvid_unet, tmp_path):
    checkpoint, _ = camvid_unet
    impossible = ParityTolerance(max_abs_rel=0.0, label_agreement=1.0, miou=1.0)
    settings = ParitySettings(count=2, tolerance={"fp32": impossible})
    with pytest.raises(ParityError, match="max \\|dlogit\\|"):
        export_onnx_gated(checkpoint, tmp_path / "m.onnx", settings=settings, progress=False)
    assert not (tmp_path / "m.onnx").exists()
    assert not read_parity(tmp_path / "m.onnx").passed


def test_precision_conversion_refuses_bad_requests():
    torch.manual_seed(0)
    spec = ModelSpec(arch="unet", classes=dataset_classes("shapes"), input_size=(32, 32), dataset="shapes")
    proto = export_onnx(Twin(build_model("unet", spec.num_classes), spec))
    with pytest.raises(ValueError, match="unknown precision"):
        convert_precision(proto, "bf8")
    with pytest.raises(ValueError, match="calibration"):
        convert_precision(proto, "int8")
    fp16 = convert_precision(proto, "fp16")
    with pytest.raises(ValueError, match="fp32 graph"):
        convert_precision(fp16, "int8", [np.zeros((1, 3, 32, 32), np.float32)])


def test_engine_rejects_bad_input_with_a_clear_message():
    spec = ModelSpec(arch="unet", classes=dataset_classes("shapes"), input_size=(32, 32), dataset="shapes")
    engine = TorchEngine(Twin(build_model("unet", spec.num_classes), spec))
    good = np.zeros((1, 3, 32, 32), np.float32)
    assert engine.labels(good).shape == (1, 32, 32) and engine.labels(good).dtype == np.uint8
    for bad, message in [
        (np.zeros((3, 32, 32), np.float32), "must be \\(N, 3, H, W\\)"),
        (np.zeros((1, 4, 32, 32), np.float32), "must be \\(N, 3, H, W\\)"),
        (np.zeros((1, 3, 32, 32), np.float64), "must be float32"),
        (np.full((1, 3, 32, 32), np.nan, np.float32), "NaN"),
        (np.zeros((0, 3, 32, 32), np.float32), "empty"),
        ([[0.0]], "numpy array"),
    ]:
        with pytest.raises(EngineInputError, match=message):
            engine.infer(bad)
    with pytest.raises(EngineInputError, match="RGB"):
        engine.prepare(np.zeros((32, 32, 4), np.uint8))


@pytest.mark.data
def test_prepared_frames_equal_the_twins_own_input(data_root):
    """uint8 camera frames and image files reach an engine as exactly what the twin normalises."""
    import cv2

    path = sorted((data_root / "camvid" / "val").glob("*.png"))[0]
    spec = ModelSpec(arch="unet", classes=dataset_classes("camvid"), input_size=(360, 480), dataset="camvid")
    frame = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    from_file = torch.from_numpy(read_rgb(path)).permute(2, 0, 1)[None]
    twin_input = spec.normalization.normalize(from_file).numpy()
    np.testing.assert_array_equal(prepare_images(frame, spec), twin_input)
    np.testing.assert_array_equal(prepare_images(from_file.numpy(), spec), twin_input)


def test_plan_target_mismatch_names_the_difference():
    built = PlanTarget(tensorrt_version="10.3.0.26", compute_capability="8.7", device_name="Orin")
    assert built.mismatch(PlanTarget(tensorrt_version="10.3.0.30", compute_capability="8.7")) is None
    assert "TensorRT 10.3.0.26" in built.mismatch(PlanTarget(tensorrt_version="11.4.0", compute_capability="8.7"))
    assert "compute capability 8.7" in built.mismatch(PlanTarget(tensorrt_version="10.3.0", compute_capability="9.0"))


@pytest.mark.data
@pytest.mark.skipif(tensorrt_missing_reason() is not None, reason=f"TensorRT: {tensorrt_missing_reason()}")
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_plan_builds_records_its_target_and_passes_parity(gated_unet, camvid_unet, precision, tmp_path):
    from export.pipeline import export_tensorrt_gated
    from export.tensorrt_engine import TensorRTEngine, current_target, read_plan_info

    out, twin, _ = gated_unet
    plan = tmp_path / f"unet.{precision}.plan"
    report = export_tensorrt_gated(out, camvid_unet[0], plan, precision=precision,
                                   settings=ParitySettings(count=8, calibration_count=8), progress=False)
    assert report.passed and report.precision == precision
    info = read_plan_info(plan)
    assert info.target == current_target() and info.precision == precision
    assert TensorRTEngine(plan).infer(np.zeros((2, 3, 96, 128), np.float32)).shape == (2, 11, 96, 128)


@pytest.mark.data
def test_cli_export_onnx_prints_the_gate_and_names_the_files(camvid_unet, tmp_path):
    import json
    import subprocess
    import sys

    checkpoint, _ = camvid_unet
    done = subprocess.run([sys.executable, "-m", "patchwatch.cli", "export", "onnx", str(checkpoint), "--out",
                           str(tmp_path / "m.onnx"), "--parity-count", "2", "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "parity PASS: onnxruntime:CPUExecutionProvider fp32 vs twin on 2 images (camvid" in done.stdout
    assert json.loads(done.stdout[done.stdout.index("{"):]) == {"fp32": str(tmp_path / "m.onnx")}
    missing = subprocess.run([sys.executable, "-m", "patchwatch.cli", "export", "onnx", str(checkpoint),
                              "--parity-data", str(tmp_path / "nothing-here")], capture_output=True, text=True)
    assert missing.returncode == 1 and "no frames at" in missing.stderr


def test_twin_miou_leaves_out_classes_with_a_handful_of_pixels():
    """A class the twin gives 150 of 691,200 pixels, half of them flipped by the engine, must not fail an engine
    that agrees everywhere else; a flip in a class with real support still counts."""
    import torch

    from export.parity import MIOU_MIN_CLASS_SHARE, twin_miou
    from segmenters.metrics import iou_from_confusion, nanmean

    cm = torch.zeros(3, 3, dtype=torch.int64)  # rows: twin's labels, columns: engine's
    cm[0, 0], cm[1, 1] = 400_000, 291_050
    cm[2, 2], cm[2, 0] = 75, 75  # the rare class: 150 pixels, half flipped
    assert 150 < MIOU_MIN_CLASS_SHARE * int(cm.sum())
    plain = nanmean(iou_from_confusion(cm))
    scored, classes = twin_miou(cm)
    assert plain < 0.9 and classes == 2 and scored > 0.999
    cm[1, 0] = 30_000  # a tenth of a large class flipped
    assert twin_miou(cm)[0] < 0.95
