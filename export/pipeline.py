"""Export with the gate closed: an engine file is kept only if it passed parity against its twin.

`export_onnx_gated` writes `model.onnx` (fp32) and, on request, `model.fp16.onnx` / `model.int8.onnx`;
`export_tensorrt_gated` builds a plan from one of them. Each kept file gets `<file>.parity.json` (the
figures, which the edge bundle carries) and `<file>.parity.png` (the worst image: input, twin labels, engine
labels, disagreement, |dlogit|). A failing file is deleted and its report kept, so the failure can be read.
"""

from __future__ import annotations

from pathlib import Path

import torch

from export.engine import Engine, EngineError, TorchEngine, prepare_images
from export.onnx_export import export_onnx, load_model, model_metadata, save_model
from export.onnxruntime_engine import OnnxRuntimeEngine
from export.parity import ParityReport, ParityTolerance, TOLERANCES, gate, parity_check, parity_images
from export.precision import convert_precision
from segmenters.files import atomic_write_text
from segmenters.twin import Twin, load_twin


def precision_path(base: str | Path, precision: str) -> Path:
    """model.onnx -> model.onnx (fp32), model.fp16.onnx, model.int8.onnx."""
    base = Path(base)
    return base if precision == "fp32" else base.with_name(f"{base.stem}.{precision}{base.suffix}")


def report_paths(engine_path: str | Path) -> tuple[Path, Path]:
    return Path(f"{engine_path}.parity.json"), Path(f"{engine_path}.parity.png")


def read_parity(engine_path: str | Path) -> ParityReport:
    path = report_paths(engine_path)[0]
    if not path.is_file():
        raise FileNotFoundError(f"{engine_path} has no parity report ({path.name}): export it through the gate")
    return ParityReport.model_validate_json(path.read_text())


class ParitySettings:
    """Which real images the gate uses, and optional tolerance overrides."""

    def __init__(
        self,
        source: str | None = None,
        count: int = 16,
        size: tuple[int, int] | None = None,
        root: str | None = None,
        tolerance: dict[str, ParityTolerance] | None = None,
        calibration_count: int = 32,
    ):
        self.source, self.count, self.size, self.root = source, count, size, root
        self.tolerance = {**TOLERANCES, **(tolerance or {})}
        self.calibration_count = calibration_count

    def images(self, twin: Twin, split: str = "val", count: int | None = None) -> tuple[str, list]:
        # an imported twin is gated again on the images its import was gated on
        source = self.source or twin.spec.training.get("gate_images") or twin.spec.dataset
        size = self.size or twin.spec.input_size
        return source, parity_images(source, count or self.count, size=size, root=self.root, split=split)


def _calibration(precision: str, twin: Twin, settings: ParitySettings) -> list | None:
    """INT8 calibrates on training images; the gate then judges on validation images."""
    if precision != "int8":
        return None
    _, images = settings.images(twin, split="train", count=settings.calibration_count)
    return [prepare_images(image, twin.spec) for _, image in images]


def _gate_file(
    engine: Engine, path: Path, reference: Engine, images: list, source: str, settings: ParitySettings, progress: bool
) -> ParityReport:
    json_path, png_path = report_paths(path)
    report = parity_check(
        engine, reference, images, source=source, tolerance=settings.tolerance[engine.precision],
        panel_path=png_path, progress=progress,
    )
    atomic_write_text(json_path, report.model_dump_json(indent=2))
    if not report.passed:
        path.unlink(missing_ok=True)
        Path(f"{path}.json").unlink(missing_ok=True)  # a rejected plan's sidecar
    return report


def export_onnx_gated(
    checkpoint: str | Path,
    out: str | Path,
    *,
    precisions: tuple[str, ...] = ("fp32",),
    settings: ParitySettings | None = None,
    opset: int = 18,
    progress: bool = True,
    device: torch.device = torch.device("cpu"),
) -> dict[str, ParityReport]:
    """Export, convert and gate on `device` (engine and reference twin both there; fp32 is TF32-free on CUDA);
    raises `ParityError` for the first precision over tolerance."""
    settings = settings or ParitySettings()
    twin = load_twin(checkpoint)
    source, images = settings.images(twin)
    fp32_path = precision_path(out, "fp32")
    proto = export_onnx(twin, fp32_path, opset=opset)
    reference = TorchEngine(twin, device=device, precision="fp32")
    reports = {}
    for precision in ("fp32",) + tuple(p for p in precisions if p != "fp32"):
        path = precision_path(out, precision)
        if precision != "fp32":
            save_model(convert_precision(proto, precision, _calibration(precision, twin, settings)), path)
        engine = OnnxRuntimeEngine(path, device=device)
        reports[precision] = _gate_file(engine, path, reference, images, source, settings, progress)
        gate(reports[precision])
    return reports


def export_tensorrt_gated(
    onnx_path: str | Path,
    checkpoint: str | Path,
    plan_path: str | Path,
    *,
    precision: str | None = None,
    profile: dict | None = None,
    workspace_bytes: int = 2 << 30,
    settings: ParitySettings | None = None,
    progress: bool = True,
    device: torch.device = torch.device("cuda", 0),
) -> ParityReport:
    """Build a TensorRT plan from a gated ONNX (converting an fp32 graph to `precision` first) and gate it on the
    CUDA `device` against the twin there (fp32, TF32 off)."""
    from export.tensorrt_engine import TensorRTEngine, build_plan, tensorrt_missing_reason

    reason = tensorrt_missing_reason()
    if reason:  # say so before spending minutes on conversion
        raise EngineError(f"cannot build a TensorRT plan: {reason}")
    settings = settings or ParitySettings()
    twin = load_twin(checkpoint)
    spec, graph_precision = model_metadata(onnx_path)
    if spec.checkpoint_digest != twin.spec.checkpoint_digest:
        raise ValueError(f"{onnx_path} was not exported from {checkpoint} (weight digests differ)")
    if device.type != "cuda":
        raise EngineError(f"a TensorRT plan runs on a CUDA device, not {device}")
    reference = TorchEngine(twin, device=device, precision="fp32")
    precision = precision or graph_precision
    if precision != graph_precision:
        converted = Path(f"{plan_path}.onnx")  # the graph this plan was built from, kept beside it
        save_model(convert_precision(load_model(onnx_path), precision, _calibration(precision, twin, settings)), converted)
        onnx_path = converted
    build_plan(onnx_path, plan_path, profile=profile, workspace_bytes=workspace_bytes)
    source, images = settings.images(twin)
    report = _gate_file(TensorRTEngine(plan_path, device=device.index or 0), Path(plan_path), reference, images, source, settings, progress)
    return gate(report)
