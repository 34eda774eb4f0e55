"""Native TensorRT: build a serialised plan from a patchwatch ONNX graph, and run it.

Written against the TensorRT 10/11 Python API (name-based I/O tensors, `execute_async_v3`, strongly typed
networks). Precision is already in the graph (see `export.precision`), so no builder precision flags are
used: TensorRT 11 removed them, and a strongly typed TensorRT 10 network takes the same graph.

A plan runs only on the TensorRT version and GPU architecture it was built for, so every plan has a JSON
sidecar (`<plan>.json`) recording both, plus the optimisation profile and the source ONNX digest.
TensorRT is not installable on the machines this project is developed on; everything here that needs it
is isolated in this module and skipped, with the reason, where it is absent.
"""

from __future__ import annotations

import platform

import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from export.engine import Engine, EngineError, EngineInputError, frames_on_device, labels_to_host
from export.onnx_export import INPUT_NAME, OUTPUT_NAME, model_metadata
from segmenters.files import atomic_write_bytes, atomic_write_text
from segmenters.spec import ModelSpec, file_digest

Shape = tuple[int, int, int, int]


class PlanTarget(BaseModel):
    """Where a plan can run: TensorRT release and GPU compute capability (e.g. "8.7" for Orin)."""

    model_config = ConfigDict(extra="forbid")  # it travels in signed manifests, read strictly

    tensorrt_version: str
    compute_capability: str
    device_name: str | None = None
    #: the CPU architecture of the machine (platform.machine(): "x86_64", "aarch64"); TensorRT plans are not portable
    cpu_arch: str | None = None

    def mismatch(self, other: PlanTarget) -> str | None:
        """Why a plan built for `self` cannot run on `other`, or None when it can."""
        if other.cpu_arch and self.cpu_arch != other.cpu_arch:
            built = f"on {self.cpu_arch}" if self.cpu_arch else "on a machine it does not record"
            return f"built {built}, the target is {other.cpu_arch}"
        if _release(self.tensorrt_version) != _release(other.tensorrt_version):
            return f"built with TensorRT {self.tensorrt_version}, this machine has TensorRT {other.tensorrt_version}"
        if self.compute_capability != other.compute_capability:
            return (
                f"built for GPU compute capability {self.compute_capability} ({self.device_name or 'unknown GPU'}),"
                f" this machine has {other.compute_capability} ({other.device_name or 'unknown GPU'})"
            )
        return None


class PlanInfo(BaseModel):
    target: PlanTarget
    precision: str
    profile: dict[str, Shape]  # min / opt / max input shapes
    workspace_bytes: int
    onnx_digest: str
    spec: ModelSpec
    built_at: float
    #: fp32 layers may run in TF32 (TensorRT's default, cleared for fp32 plans so that fp32 means fp32)
    tf32: bool = False


class PlanMismatchError(EngineError):
    """A plan was built for another TensorRT release or GPU."""


def _release(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:3])


def tensorrt_missing_reason() -> str | None:
    """None when native TensorRT can run here, else why not."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt Python package is not installed (it needs an NVIDIA GPU machine)"
    import torch

    if not torch.cuda.is_available():
        return "tensorrt is installed but no CUDA device is visible"
    return None


def current_target() -> PlanTarget | None:
    """This machine's TensorRT release and GPU, or None when it has no TensorRT."""
    if tensorrt_missing_reason() is not None:
        return None
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability()
    return PlanTarget(tensorrt_version=trt.__version__, compute_capability=f"{major}.{minor}",
                      device_name=torch.cuda.get_device_name(), cpu_arch=platform.machine())


def sidecar_path(plan_path: str | Path) -> Path:
    return Path(str(plan_path) + ".json")


def read_plan_info(plan_path: str | Path) -> PlanInfo:
    side = sidecar_path(plan_path)
    if not side.is_file():
        raise EngineError(f"{plan_path} has no sidecar {side.name}: cannot tell which TensorRT/GPU it was built for")
    return PlanInfo.model_validate_json(side.read_text())


def default_profile(spec: ModelSpec, max_batch: int = 8) -> dict[str, Shape]:
    height, width = spec.input_size
    return {"min": (1, 3, height, width), "opt": (1, 3, height, width), "max": (max_batch, 3, height, width)}


def build_plan(
    onnx_path: str | Path,
    plan_path: str | Path,
    *,
    profile: dict[str, Shape] | None = None,
    workspace_bytes: int = 2 << 30,
    tf32: bool = False,
) -> PlanInfo:
    """Parse the ONNX, build a serialised plan for this GPU, write it with its sidecar."""
    reason = tensorrt_missing_reason()
    if reason:
        raise EngineError(f"cannot build a TensorRT plan: {reason}")
    import tensorrt as trt

    spec, precision = model_metadata(onnx_path)
    profile = profile or default_profile(spec)
    for key in ("min", "opt", "max"):
        if key not in profile:
            raise ValueError(f"optimisation profile needs min, opt and max shapes, missing {key!r}")
    if not all(lo <= mid <= hi for lo, mid, hi in zip(profile["min"], profile["opt"], profile["max"])):
        raise ValueError(f"optimisation profile must satisfy min <= opt <= max per dimension, got {profile}")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:  # required on 10.x for graph-defined precision; accepted and implied on 11.x
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")
    config = _builder_config(builder, profile, workspace_bytes, tf32)
    serialised = builder.build_serialized_network(network, config)
    if serialised is None:
        raise EngineError(f"TensorRT failed to build a plan from {onnx_path} (see the TensorRT log above)")
    info = PlanInfo(
        target=current_target(),
        precision=precision,
        profile={k: tuple(int(d) for d in v) for k, v in profile.items()},
        workspace_bytes=workspace_bytes,
        onnx_digest=file_digest(onnx_path),
        spec=spec,
        built_at=time.time(),
        tf32=tf32,
    )
    atomic_write_bytes(plan_path, bytes(serialised))
    atomic_write_text(sidecar_path(plan_path), info.model_dump_json(indent=2))
    return info


def _builder_config(builder, profile: dict[str, Shape], workspace_bytes: int, tf32: bool):
    """Workspace, the optimisation profile, and TF32 cleared unless asked for (TensorRT's default allows it)."""
    import tensorrt as trt

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    tf32_flag = getattr(trt.BuilderFlag, "TF32", None)
    if tf32_flag is not None and not tf32:
        config.clear_flag(tf32_flag)
    optimisation = builder.create_optimization_profile()
    optimisation.set_shape(INPUT_NAME, profile["min"], profile["opt"], profile["max"])
    config.add_optimization_profile(optimisation)
    return config


class TensorRTEngine(Engine):
    def __init__(self, plan_path: str | Path, device: int = 0):
        reason = tensorrt_missing_reason()
        if reason:
            raise EngineError(f"cannot run a TensorRT plan: {reason}")
        import tensorrt as trt
        import torch

        self.info = read_plan_info(plan_path)
        here = current_target()
        why = self.info.target.mismatch(here)
        if why:
            raise PlanMismatchError(f"{plan_path}: {why}")
        self.spec, self.precision = self.info.spec, self.info.precision
        self.torch_device = torch.device("cuda", device)
        self._torch = torch
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise EngineError(f"TensorRT could not deserialise {plan_path}")
        self.context = self.engine.create_execution_context()
        self.backend = "tensorrt"
        self.device = f"cuda:{device} ({torch.cuda.get_device_name(device)})"

    @property
    def math(self) -> str:
        return "tf32" if self.precision == "fp32" and self.info.tf32 else self.precision

    def _forward(self, x) -> object:
        """Normalised (N, 3, H, W) float32 on the device -> logits on the device."""
        torch = self._torch
        low, high = self.info.profile["min"], self.info.profile["max"]
        if not all(lo <= d <= hi for lo, d, hi in zip(low, x.shape, high)):
            raise EngineInputError(f"input shape {tuple(x.shape)} is outside the plan's profile {low}..{high}")
        if not self.context.set_input_shape(INPUT_NAME, tuple(x.shape)):
            raise EngineInputError(f"TensorRT refused input shape {tuple(x.shape)}")
        out = torch.empty(tuple(self.context.get_tensor_shape(OUTPUT_NAME)), dtype=torch.float32, device=self.torch_device)
        self.context.set_tensor_address(INPUT_NAME, x.data_ptr())
        self.context.set_tensor_address(OUTPUT_NAME, out.data_ptr())
        stream = torch.cuda.current_stream(self.torch_device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise EngineError("TensorRT execution failed")
        return out

    def _run(self, images: np.ndarray) -> np.ndarray:
        return self._forward(self._torch.from_numpy(images).to(self.torch_device)).cpu().numpy()

    def _labels(self, images: np.ndarray) -> np.ndarray:
        return labels_to_host(self._forward(self._torch.from_numpy(images).to(self.torch_device)), self.spec)

    def _segment_frames(self, frames: np.ndarray) -> np.ndarray:
        return labels_to_host(self._forward(frames_on_device(frames, self.spec, self.torch_device)), self.spec)

    def describe(self) -> dict:
        return {**super().describe(), "target": self.info.target.model_dump()}
