"""Engines: twins exported to ONNX and TensorRT, behind one `Engine` interface, shipped only through the
parity gate."""

from export.engine import Engine, EngineError, EngineInputError, TorchEngine, label_dtype, prepare_images
from export.onnx_export import OnnxExportError, export_onnx, model_metadata
from export.onnxruntime_engine import OnnxRuntimeEngine, available_providers
from export.parity import ParityError, ParityReport, ParityTolerance, TOLERANCES, gate, parity_check, parity_images


def load_engine(path, device="auto", **options) -> Engine:
    """An engine file -> the `Engine` for it on `device` (auto, cpu, cuda[:N] or a torch.device): `.onnx` through
    ONNX Runtime, `.plan`/`.engine` through TensorRT (CUDA only). `options` go to the engine's constructor."""
    from pathlib import Path

    suffix = Path(path).suffix.lower()
    if suffix in (".plan", ".engine"):
        from export.tensorrt_engine import TensorRTEngine

        text = str(device)
        if text == "cpu":
            raise EngineError(f"{path}: a TensorRT plan runs on a CUDA device, not the CPU")
        return TensorRTEngine(path, device=int(text.partition(":")[2] or 0), **options)
    if suffix == ".onnx":
        return OnnxRuntimeEngine(path, device=device, **options)
    raise EngineError(f"{path}: unknown engine file type {suffix!r} (expected .onnx or .plan)")


__all__ = [
    "Engine", "EngineError", "EngineInputError", "OnnxExportError", "OnnxRuntimeEngine", "ParityError",
    "ParityReport", "ParityTolerance", "TOLERANCES", "TorchEngine", "available_providers", "export_onnx", "gate",
    "label_dtype", "load_engine", "model_metadata", "parity_check", "parity_images", "prepare_images",
]
