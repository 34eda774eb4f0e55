"""`Engine.segment`: frames in, labels out, normalisation and argmax where the engine runs; on the CPU bit for bit
what `labels(prepare(frames))` gives. The device policy, provider choice and the parity report's math mode."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from export import EngineError, EngineInputError, OnnxRuntimeEngine, TorchEngine, export_onnx, parity_check
from export.onnxruntime_engine import available_providers, provider_problem
from export.precision import convert_precision
from segmenters.data import build_dataset
from segmenters.device import DeviceError, assigned_device, device_name, resolve_device
from segmenters.models import MODELS, build_model
from segmenters.spec import ClassInfo, ModelSpec
from segmenters.twin import Twin

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens on a machine without CUDA")


def camvid_frames(data_root, count: int = 4, size=(96, 128)) -> np.ndarray:
    data = build_dataset("camvid", "val", root=data_root / "camvid", size=size)
    images = [data[i][0].numpy() for i in range(0, 8 * count, 8)]
    return np.stack([np.round(image.transpose(1, 2, 0) * 255).astype(np.uint8) for image in images])


@pytest.fixture(scope="module")
def trained_engines(camvid_unet):
    """Every engine kind this machine has, around the briefly trained CamVid U-Net (varied label maps)."""
    _, twin = camvid_unet
    fp32 = export_onnx(twin)
    return {"torch": TorchEngine(twin), "onnx-fp32": OnnxRuntimeEngine(fp32, device="cpu"),
            "onnx-fp16": OnnxRuntimeEngine(convert_precision(fp32, "fp16"), device="cpu")}


@pytest.mark.data
@pytest.mark.parametrize("kind", ["torch", "onnx-fp32", "onnx-fp16"])
def test_segment_equals_labels_of_prepare_bit_for_bit_on_the_cpu(kind, trained_engines, data_root):
    engine = trained_engines[kind]
    frames = camvid_frames(data_root)
    expected = engine.labels(engine.prepare(frames))
    assert np.unique(expected).size >= 3, "the comparison needs varied label maps to be able to fail"
    labels = engine.segment(frames)
    assert labels.dtype == np.uint8 and labels.shape == frames.shape[:3]
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_array_equal(engine.segment(list(frames)), expected)  # a sequence of frames
    np.testing.assert_array_equal(engine.segment(frames[1]), expected[1:2])  # one frame
    images = frames.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)  # float images in [0, 1]
    np.testing.assert_array_equal(engine.segment(images), engine.labels(engine.prepare(images)))


@pytest.mark.data
def test_threads_that_do_not_spin_give_the_same_labels(trained_engines, data_root):
    """`spin=False` (idle threads yield their cores to a monitor's detectors) changes scheduling, not results."""
    engine = trained_engines["onnx-fp32"]
    quiet = OnnxRuntimeEngine(engine.proto, device="cpu", spin=False)
    frames = camvid_frames(data_root)
    assert not quiet.spin and engine.spin
    np.testing.assert_array_equal(quiet.segment(frames), engine.segment(frames))


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_every_zoo_model_segments_as_it_labels(arch):
    torch.manual_seed(0)
    spec = ModelSpec(arch=arch, classes=[ClassInfo(name=f"c{i}", color=(i, i, i)) for i in range(7)],
                     input_size=(64, 96), dataset="camvid")
    twin = Twin(build_model(arch, spec.num_classes).eval(), spec)
    frames = np.random.default_rng(0).integers(0, 256, (2, 64, 96, 3), dtype=np.uint8)
    for engine in (TorchEngine(twin), OnnxRuntimeEngine(export_onnx(twin), device="cpu")):
        np.testing.assert_array_equal(engine.segment(frames), engine.labels(engine.prepare(frames)))


def test_more_than_256_classes_give_int32_labels():
    spec = ModelSpec(arch="unet", classes=[ClassInfo(name=f"c{i}", color=(i % 256, 0, 0)) for i in range(300)],
                     input_size=(32, 32), dataset="camvid")
    twin = Twin(build_model("unet", spec.num_classes).eval(), spec)
    frames = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    for engine in (TorchEngine(twin), OnnxRuntimeEngine(export_onnx(twin), device="cpu")):
        labels = engine.segment(frames)
        assert labels.dtype == np.int32
        np.testing.assert_array_equal(labels, engine.labels(engine.prepare(frames)))


def test_segment_refuses_bad_frames_naming_what_is_wrong(trained_engines):
    engine = trained_engines["onnx-fp32"]
    with pytest.raises(EngineInputError, match="RGB"):
        engine.segment(np.zeros((1, 32, 32, 4), np.uint8))
    with pytest.raises(EngineInputError, match="empty"):
        engine.segment(np.zeros((0, 32, 32, 3), np.uint8))
    with pytest.raises(EngineInputError, match="uint8 RGB or float"):
        engine.segment(np.zeros((1, 32, 32, 3), np.int16))
    with pytest.raises(EngineInputError, match="NaN"):
        engine.segment(np.full((1, 3, 32, 32), np.nan, np.float32))


def test_onnx_segment_never_holds_the_logits_on_the_host(trained_engines):
    """The host memory a segment call allocates is the labels, not the float32 logits (C x 4 bytes a pixel)."""
    engine = trained_engines["onnx-fp32"]
    frames = np.random.default_rng(0).integers(0, 256, (4, 96, 128, 3), dtype=np.uint8)
    logits_bytes = frames.shape[0] * engine.spec.num_classes * 96 * 128 * 4
    engine.segment(frames)  # the labels graph's session is built on first use

    def peak(call) -> int:
        tracemalloc.start()
        call()
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    assert peak(lambda: engine.labels(engine.prepare(frames))) >= logits_bytes  # the old path: logits on the host
    assert peak(lambda: engine.segment(frames)) < logits_bytes / engine.spec.num_classes  # about the labels alone


# ------------------------------------------------------------------------------------------ device policy
def test_device_requests_resolve_or_fail_clearly():
    assert resolve_device("cpu") == torch.device("cpu")
    assert device_name(" CUDA:1 ") == "cuda:1" and device_name(None) == "auto"
    for bad in ("gpu", "cpu:0", "cuda:x", "tpu"):
        with pytest.raises(DeviceError, match="unknown device"):
            resolve_device(bad)
    # inside a Ray task: the GPU Ray gave it, else the CPU for auto; a CUDA request without one is refused
    assert assigned_device("auto", []) == torch.device("cpu")
    with pytest.raises(DeviceError, match="num_gpus"):
        assigned_device("cuda", [])


@no_gpu
def test_auto_is_the_cpu_and_cuda_is_refused_on_a_machine_without_cuda():
    assert resolve_device("auto") == torch.device("cpu")
    for request in ("cuda", "cuda:0"):
        with pytest.raises(DeviceError, match=f"'{request}' was asked for"):
            resolve_device(request)


@no_gpu
def test_export_with_cuda_here_fails_before_any_work(camvid_unet, tmp_path):
    from patchwatch.cli import main

    checkpoint, _ = camvid_unet
    out = tmp_path / "model.onnx"
    result = CliRunner().invoke(main, ["export", "onnx", str(checkpoint), "--out", str(out), "--device", "cuda"])
    assert result.exit_code == 2 and "cuda" in result.output and "--device" in result.output
    assert not list(tmp_path.iterdir())


def test_only_providers_whose_libraries_load_are_offered(trained_engines):
    offered = available_providers()
    assert offered[-1] == "CPUExecutionProvider"
    assert all(provider_problem(p) is None for p in offered)
    if "CUDAExecutionProvider" not in offered:
        with pytest.raises(EngineError, match="device 'cuda:0' was asked for.*patchwatch\\[gpu\\]"):
            OnnxRuntimeEngine(trained_engines["onnx-fp32"].proto, device="cuda:0")
        assert OnnxRuntimeEngine(trained_engines["onnx-fp32"].proto, device="auto").device == "cpu"
    with pytest.raises(EngineError, match="tf32"):
        OnnxRuntimeEngine(trained_engines["onnx-fp32"].proto, device="cpu", tf32=True)
    twin = Twin(trained_engines["torch"].model, trained_engines["torch"].spec)
    with pytest.raises(ValueError, match="tf32 is a CUDA math mode"):
        TorchEngine(twin, device="cpu", precision="tf32")


@pytest.mark.data
def test_parity_report_records_device_and_math_of_both_sides(trained_engines, data_root):
    from export.parity import parity_images

    images = parity_images("camvid", 2, size=(96, 128), root=str(data_root / "camvid"))
    report = parity_check(trained_engines["onnx-fp32"], trained_engines["torch"], images)
    assert report.engine["device"] == report.reference["device"] == "cpu"
    assert report.engine["math"] == report.reference["math"] == "fp32"
    assert "twin              torch:cpu on cpu, fp32 math" in report.text()


# ------------------------------------------------------------------------------------------ on a GPU
@pytest.mark.gpu
@needs_cuda
@pytest.mark.data
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_torch_segment_on_cuda_matches_the_cpu_twin(precision, camvid_unet, data_root):
    _, twin = camvid_unet
    cpu = TorchEngine(Twin(build_model(twin.spec.arch, twin.spec.num_classes), twin.spec))
    cpu.model.load_state_dict(twin.model.state_dict())
    gpu = TorchEngine(Twin(build_model(twin.spec.arch, twin.spec.num_classes), twin.spec), device="cuda",
                      precision=precision)
    gpu.model.load_state_dict(twin.model.state_dict())
    frames = camvid_frames(data_root)
    agreement = (gpu.segment(frames) == cpu.segment(frames)).mean()
    assert agreement >= (0.9999 if precision == "fp32" else 0.999)
    assert gpu.describe()["math"] == precision and gpu.describe()["device"].startswith("cuda:")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.data
def test_onnx_cuda_segment_and_fp32_gate_with_tf32_off(trained_engines, camvid_unet, data_root):
    if provider_problem("CUDAExecutionProvider"):
        pytest.skip(f"ONNX Runtime CUDA: {provider_problem('CUDAExecutionProvider')}")
    from export.parity import TOLERANCES, parity_images

    _, twin = camvid_unet
    engine = OnnxRuntimeEngine(trained_engines["onnx-fp32"].proto, device="cuda:0")
    assert engine.device == "cuda:0" and engine.math == "fp32"
    frames = camvid_frames(data_root)
    assert (engine.segment(frames) == engine.labels(engine.prepare(frames))).mean() >= 0.9999
    reference = TorchEngine(Twin(build_model(twin.spec.arch, twin.spec.num_classes), twin.spec), device="cuda")
    reference.model.load_state_dict(twin.model.state_dict())
    images = parity_images("camvid", 4, size=(96, 128), root=str(data_root / "camvid"))
    report = parity_check(engine, reference, images, tolerance=TOLERANCES["fp32"])
    assert report.passed, report.text()


def test_a_replica_runs_onnx_runtime_on_the_cpus_ray_reserved_for_it():
    """ONNX Runtime's default (every core) would put a replica granted one CPU on all of them."""
    from serving.config import ModelConfig

    assert ModelConfig(name="m", path="m.onnx").engine_threads == 1
    assert ModelConfig(name="m", path="m.onnx", num_cpus=0.5).engine_threads == 1
    assert ModelConfig(name="m", path="m.onnx", num_cpus=3).engine_threads == 3
    assert ModelConfig(name="m", path="m.onnx", num_cpus=3, threads=2).engine_threads == 2


def test_a_served_model_names_its_device_and_gets_its_gpu_from_ray():
    from pydantic import ValidationError

    from serving.config import ModelConfig

    assert ModelConfig(name="m", path="m.onnx").device == "auto"
    assert ModelConfig(name="m", path="m.onnx", device="CUDA:0", num_gpus=0.5).device == "cuda:0"
    with pytest.raises(ValidationError, match="needs num_gpus > 0"):
        ModelConfig(name="m", path="m.onnx", device="cuda")
    with pytest.raises(ValidationError, match="unknown device 'gpu'"):
        ModelConfig(name="m", path="m.onnx", device="gpu", num_gpus=1)
