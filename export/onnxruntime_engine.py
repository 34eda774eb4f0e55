"""ONNX Runtime engine: TensorRT, CUDA or CPU execution provider, whichever the installed build offers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from export.engine import Engine, EngineError
from export.onnx_export import INPUT_NAME, load_model, model_metadata

# Preference order; ONNX Runtime falls back down the list for nodes a provider cannot run.
PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def available_providers() -> list[str]:
    import onnxruntime as ort

    installed = set(ort.get_available_providers())
    return [p for p in PROVIDER_PREFERENCE if p in installed]


class OnnxRuntimeEngine(Engine):
    def __init__(
        self,
        model: str | Path | onnx.ModelProto,
        providers: list[str] | None = None,
        threads: int | None = None,
    ):
        import onnxruntime as ort

        proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
        self.spec, self.precision = model_metadata(proto)
        installed = available_providers()
        chosen = providers or installed
        missing = [p for p in chosen if p not in installed]
        if missing:
            raise EngineError(f"execution providers {missing} are not in this onnxruntime build (it has {installed})")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(proto.SerializeToString(), options, providers=chosen)
        except Exception as exc:
            raise EngineError(f"onnxruntime could not load the model: {exc}") from exc
        self.providers = self.session.get_providers()
        self.backend = f"onnxruntime:{self.providers[0]}"
        self.source = None if isinstance(model, onnx.ModelProto) else str(model)

    def _run(self, images: np.ndarray) -> np.ndarray:
        try:
            (logits,) = self.session.run(None, {INPUT_NAME: images})
        except Exception as exc:
            raise EngineError(f"onnxruntime failed on input of shape {images.shape}: {exc}") from exc
        return logits.astype(np.float32, copy=False)

    def describe(self) -> dict:
        return {**super().describe(), "providers": self.providers}
