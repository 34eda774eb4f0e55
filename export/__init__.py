"""Engines: twins exported to ONNX and TensorRT, behind one `Engine` interface, shipped only through the
parity gate."""

from export.engine import Engine, EngineError, EngineInputError, TorchEngine, prepare_images
from export.onnx_export import OnnxExportError, export_onnx, model_metadata
from export.onnxruntime_engine import OnnxRuntimeEngine, available_providers
from export.parity import ParityError, ParityReport, ParityTolerance, TOLERANCES, gate, parity_check, parity_images


def load_engine(path, **options) -> Engine:
    """An engine file -> the `Engine` for it: `.onnx` through ONNX Runtime, `.plan`/`.engine` through TensorRT."""
    from pathlib import Path

    suffix = Path(path).suffix.lower()
    if suffix in (".plan", ".engine"):
        from export.tensorrt_engine import TensorRTEngine

        return TensorRTEngine(path, **options)
    if suffix == ".onnx":
        return OnnxRuntimeEngine(path, **options)
    raise EngineError(f"{path}: unknown engine file type {suffix!r} (expected .onnx or .plan)")


__all__ = [
    "Engine", "EngineError", "EngineInputError", "OnnxExportError", "OnnxRuntimeEngine", "ParityError",
    "ParityReport", "ParityTolerance", "TOLERANCES", "TorchEngine", "available_providers", "export_onnx", "gate",
    "load_engine", "model_metadata", "parity_check", "parity_images", "prepare_images",
]
