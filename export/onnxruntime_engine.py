"""ONNX Runtime engine, on the CPU or a CUDA device.

Only the execution providers whose libraries load are offered: an onnxruntime-gpu build lists the CUDA and
TensorRT providers whatever is installed, and a session that asks for one whose libraries are missing prints an
"EP Error" block and falls back. `available_providers()` tries to load each provider's shared library first.

On CUDA, fp32 means fp32: the CUDA provider's TF32 math is off (`use_tf32=0`) unless the engine is asked for tf32.
`segment` runs a second graph, the model with the normalisation prepended (uint8 NHWC frames in) and an ArgMax
appended (uint8 labels out), so on a GPU only uint8 crosses the bus and the logits never reach the host.
"""

from __future__ import annotations

import ctypes
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from export.engine import Engine, EngineError
from export.onnx_export import INPUT_NAME, OUTPUT_NAME, load_model, model_metadata
from segmenters.spec import ModelSpec

# Preference order; the TensorRT provider is used only when asked for by name (it builds its own engines, in
# its own precision, at session creation: that is `export tensorrt`'s job).
PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
GPU_PROVIDERS = {"TensorrtExecutionProvider": "tensorrt", "CUDAExecutionProvider": "cuda"}
FRAMES_NAME, LABELS_NAME = "frames", "labels"


@lru_cache(maxsize=1)
def _preload() -> None:
    """Load the CUDA/cuDNN libraries onnxruntime-gpu was built against (from the nvidia-* wheels or torch's)."""
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls") and any(p in ort.get_available_providers() for p in GPU_PROVIDERS):
        try:
            ort.preload_dlls()
        except Exception:  # nothing to preload here; the provider check below says what is missing
            pass


@lru_cache(maxsize=None)
def provider_problem(provider: str) -> str | None:
    """None when `provider`'s library loads here, else why not (a missing libcudart, libnvinfer, ...)."""
    import onnxruntime as ort

    if provider not in ort.get_available_providers():
        return f"this onnxruntime build ({ort.__version__}) has no {provider}"
    if provider not in GPU_PROVIDERS:
        return None
    _preload()
    library = Path(ort.__file__).parent / "capi" / f"libonnxruntime_providers_{GPU_PROVIDERS[provider]}.so"
    try:
        ctypes.CDLL(str(library))
    except OSError as exc:
        return f"{provider} does not load: {exc}"
    import torch

    if not torch.cuda.is_available():
        return f"{provider} loads, but no CUDA device is visible"
    return None


def available_providers() -> list[str]:
    """The providers of this build whose libraries load, in preference order."""
    return [p for p in PROVIDER_PREFERENCE if provider_problem(p) is None]


def _cuda_index(device) -> int | None:
    """None for the CPU, else the CUDA device index ("auto" -> 0 when the CUDA provider can run here)."""
    text = str(device).strip().lower()
    if text == "cpu":
        return None
    if text == "auto":
        return 0 if provider_problem("CUDAExecutionProvider") is None else None
    if text == "cuda" or text.startswith("cuda:"):
        return int(text.partition(":")[2] or 0)
    raise EngineError(f"unknown device {device!r} for ONNX Runtime: expected auto, cpu, cuda or cuda:N")


class OnnxRuntimeEngine(Engine):
    """`device`: cpu, cuda[:N] or auto (CUDA when its provider loads and a GPU is visible). `providers`: explicit
    provider names instead (e.g. ["TensorrtExecutionProvider", "CUDAExecutionProvider"]). `provider_options`: the
    CUDA provider's options (cudnn_conv_algo_search, gpu_mem_limit, ...). `tf32`: allow TF32 math on CUDA
    (precision "tf32", gated with its own tolerance). `spin`: let idle intra-op threads spin-wait (ONNX Runtime's
    default, lowest latency on a machine of its own); off, they yield their cores to what shares the machine (a
    monitor's detectors: bench/monitor_throughput.py --spin both)."""

    def __init__(self, model: str | Path | onnx.ModelProto, providers: list[str] | None = None,
                 threads: int | None = None, device: str | object = "auto", provider_options: dict | None = None,
                 tf32: bool = False, spin: bool = True):
        self.proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
        self.spec, self.precision = model_metadata(self.proto)
        self.threads, self.spin = threads, spin
        self._providers = self._choose(providers, device, dict(provider_options or {}), tf32)
        self.session = self._session(self.proto)
        self.providers = self.session.get_providers()
        self.backend = f"onnxruntime:{self.providers[0]}"
        on_gpu = self.providers[0] in GPU_PROVIDERS
        self.device = f"cuda:{self._device_id}" if on_gpu else "cpu"
        if tf32:
            self.precision = "tf32"
        self.source = None if isinstance(model, onnx.ModelProto) else str(model)
        self._frames_session = None
        self._frames_lock = threading.Lock()

    def _choose(self, providers: list[str] | None, device, options: dict, tf32: bool) -> list:
        """The provider list for the session: names with their options, CPU last as the fallback for odd nodes."""
        if tf32 and self.precision != "fp32":
            raise EngineError(f"tf32 applies to fp32 graphs; this graph is {self.precision}")
        index = None if providers else _cuda_index(device)
        names = list(providers) if providers else (["CUDAExecutionProvider"] if index is not None else [])
        for name in names:
            problem = provider_problem(name)
            if problem:
                where = f"device {device!r} was asked for, but " if not providers else ""
                raise EngineError(f"{where}{problem} (CUDA needs onnxruntime-gpu: pip install 'patchwatch[gpu]')")
        if tf32 and "CUDAExecutionProvider" not in names:
            raise EngineError("tf32 is a CUDA math mode: give a CUDA device")
        self._device_id = int(options.get("device_id", index or 0))
        chosen = []
        for name in names:
            if name == "CUDAExecutionProvider":
                chosen.append((name, {"device_id": self._device_id, "use_tf32": int(tf32), **options}))
            elif name != "CPUExecutionProvider":
                chosen.append((name, {"device_id": self._device_id}))
        return chosen + ["CPUExecutionProvider"]

    def _session(self, proto: onnx.ModelProto):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            options.intra_op_num_threads = self.threads
        if not self.spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            return ort.InferenceSession(proto.SerializeToString(), options, providers=self._providers)
        except Exception as exc:
            raise EngineError(f"onnxruntime could not load the model: {exc}") from exc

    def _run(self, images: np.ndarray) -> np.ndarray:
        try:
            (logits,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: images})
        except Exception as exc:
            raise EngineError(f"onnxruntime failed on input of shape {images.shape}: {exc}") from exc
        return logits.astype(np.float32, copy=False)

    def _segment_frames(self, frames: np.ndarray) -> np.ndarray:
        session = self._segment_session()
        try:
            (labels,) = session.run([LABELS_NAME], {FRAMES_NAME: frames})
        except Exception as exc:
            raise EngineError(f"onnxruntime failed on frames of shape {frames.shape}: {exc}") from exc
        return labels

    def _segment_session(self):
        """The frames -> labels graph's session, built on first use (one per engine, shared by threads)."""
        with self._frames_lock:
            if self._frames_session is None:
                self._frames_session = self._session(segment_graph(self.proto, self.spec))
            return self._frames_session

    def release_memory(self) -> None:
        """Shrink ONNX Runtime's CPU arenas, which otherwise keep the peak of the largest run for good: each
        session that has run runs once more, at the spec's input size, with arena shrinkage on (unused arena
        chunks are freed at the end of such a run)."""
        import onnxruntime as ort

        options = ort.RunOptions()
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        frames = np.zeros((1, *self.spec.input_size, 3), np.uint8)
        with self._frames_lock:
            frames_session = self._frames_session
        try:
            self.session.run([OUTPUT_NAME], {INPUT_NAME: self.prepare(frames)}, options)
            if frames_session is not None:
                frames_session.run([LABELS_NAME], {FRAMES_NAME: frames}, options)
        except Exception as exc:
            raise EngineError(f"onnxruntime failed to shrink its arena: {exc}") from exc

    def describe(self) -> dict:
        return {**super().describe(), "providers": self.providers, "threads": self.threads or "all cores"}


def segment_graph(proto: onnx.ModelProto, spec: ModelSpec) -> onnx.ModelProto:
    """The engine graph with the spec's normalisation in front and an ArgMax behind: (N, H, W, 3) uint8 frames in,
    (N, H, W) uint8 labels out (int32 beyond 256 classes). The arithmetic is `frames_to_images` then
    `Normalization.normalize`, op for op, so on the CPU it computes the same bits as `labels(prepare(frames))`."""
    low, high = spec.normalization.value_range
    mean, std = (np.asarray(v, np.float32).reshape(1, 3, 1, 1) for v in (spec.normalization.mean,
                                                                         spec.normalization.std))
    constants = {"pw_255": np.float32(255.0), "pw_span": np.float32(high - low), "pw_low": np.float32(low),
                 "pw_mean": mean, "pw_std": std}
    initialisers = [onnx.numpy_helper.from_array(np.asarray(v, np.float32), name) for name, v in constants.items()]
    label_type = TensorProto.UINT8 if spec.num_classes <= 256 else TensorProto.INT32
    front = [
        helper.make_node("Transpose", [FRAMES_NAME], ["pw_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Cast", ["pw_nchw"], ["pw_float"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["pw_float", "pw_255"], ["pw_unit"]),
        helper.make_node("Mul", ["pw_unit", "pw_span"], ["pw_scaled"]),
        helper.make_node("Add", ["pw_scaled", "pw_low"], ["pw_ranged"]),
        helper.make_node("Sub", ["pw_ranged", "pw_mean"], ["pw_centred"]),
        helper.make_node("Div", ["pw_centred", "pw_std"], [INPUT_NAME]),
    ]
    back = [
        helper.make_node("ArgMax", [OUTPUT_NAME], ["pw_argmax"], axis=1, keepdims=0),
        helper.make_node("Cast", ["pw_argmax"], [LABELS_NAME], to=label_type),
    ]
    graph = proto.graph
    frames = helper.make_tensor_value_info(FRAMES_NAME, TensorProto.UINT8, ["batch", "height", "width", 3])
    labels = helper.make_tensor_value_info(LABELS_NAME, label_type, ["batch", "height", "width"])
    composed = helper.make_graph(front + list(graph.node) + back, f"{graph.name}_segment", [frames], [labels],
                                 initializer=initialisers + list(graph.initializer), value_info=list(graph.value_info))
    model = helper.make_model(composed, opset_imports=list(proto.opset_import), ir_version=proto.ir_version)
    model.functions.extend(proto.functions)
    return model
