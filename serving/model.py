"""One Ray Serve deployment per served model version: a replica owns one `Engine` and batches requests into it.

A request reaches the replica as an `InferCall` already checked by the ingress (`check_call`), so the replica
only batches, normalises camera frames from the `ModelSpec` (`Engine.prepare`), runs the engine, and returns
the outputs asked for: logits and/or the label map.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import time
from dataclasses import dataclass, replace

import numpy as np
from ray import serve

from export.engine import Engine, EngineError, label_dtype
from segmenters.spec import ModelSpec
from serving.config import MIB, ModelConfig
from serving.metrics import ModelMetrics
from serving.protocol import ProtocolError, datatype_of, shown
from serving.shared_memory import SegmentElsewhere, SegmentSlice, WrittenOutput

#: the OIP inputs a model takes; a request carries exactly one of them
INPUTS = {
    "images": {"datatype": "FP32", "layout": "NCHW", "about": "images normalised by the model spec's mean/std"},
    "frames": {"datatype": "UINT8", "layout": "NHWC", "about": "RGB camera frames 0..255, normalised server-side"},
}
OUTPUTS = ("logits", "labels")
#: smaller images than this make the deepest encoders' feature maps vanish
MIN_SIDE = 32
#: a call whose tensor and label maps together stay under this travels to the replica by value, over the replica's
#: own gRPC channel (Serve's `_by_reference=False`): ~1 ms less than a Ray actor call (bench/serve_paths.py), and
#: well inside that channel's 4 MiB message limit; larger calls, and any wanting logits, go as Ray actor calls
BY_VALUE_MAX_BYTES = 1 * MIB


@dataclass(frozen=True)
class InferCall:
    input_name: str  # "images" or "frames"
    array: np.ndarray | None  # None in transit when `source` holds the input
    outputs: tuple[str, ...]
    #: a shared-memory slice the replica reads the input from (`serving.shared_memory`), and its shape
    source: SegmentSlice | None = None
    source_shape: tuple[int, ...] = ()
    #: outputs the replica writes into shared-memory slices instead of answering them
    targets: tuple[tuple[str, SegmentSlice], ...] = ()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape) if self.array is not None else self.source_shape

    @property
    def input_bytes(self) -> int:
        return self.array.nbytes if self.array is not None else self.source.byte_size

    @property
    def images(self) -> int:
        return int(self.shape[0])

    @property
    def pixels(self) -> int:
        """Input pixels over the batch: what the engine's working memory scales with."""
        return tensor_pixels(self.input_name, self.shape)

    def memory_bytes(self, bytes_per_pixel: int) -> int:
        """What running this call holds: its tensor plus the engine's memory for its pixels."""
        return self.input_bytes + self.pixels * bytes_per_pixel

    @property
    def by_value(self) -> bool:
        """Small enough, both ways, to travel by value (`BY_VALUE_MAX_BYTES`): no logits coming back as data, and
        the input and label maps that do travel (one byte a pixel) under the limit."""
        written = {name for name, _ in self.targets}
        if "logits" in self.outputs and "logits" not in written:
            return False
        labels = self.pixels if "labels" in self.outputs and "labels" not in written else 0
        travelling = 0 if self.array is None else self.array.nbytes
        return travelling + labels <= BY_VALUE_MAX_BYTES

    def through_segments(self, source: SegmentSlice | None, targets: dict[str, SegmentSlice]) -> InferCall:
        """This call with its input read from `source` (if any) and `targets`' outputs written by the replica."""
        return replace(self, source=source, source_shape=self.shape, targets=tuple(targets.items()))

    def in_transit(self) -> InferCall:
        """What travels to the replica: without the array when the replica reads it from its slice."""
        return self if self.source is None else replace(self, array=None)

    def with_data(self) -> InferCall:
        """This call with its data and no slices (for a replica on another node than the segments)."""
        return replace(self, source=None, source_shape=(), targets=())


def tensor_pixels(input_name: str, shape: tuple[int, ...]) -> int:
    """N x H x W of an `images` (NCHW) or `frames` (NHWC) shape, as a Python integer (never overflows)."""
    batch, height, width = (shape[0], shape[2], shape[3]) if input_name == "images" else shape[:3]
    return int(batch) * int(height) * int(width)


def check_budget(what: str, needed: int, budget: int) -> None:
    """A 413 naming the request's memory and the budget when the one is over the other."""
    if needed > budget:
        raise ProtocolError(f"{what} needs {needed / MIB:.1f} MiB to decode and run ({needed} bytes), over the "
                            f"limit of {budget / MIB:.1f} MiB a request may need (request_budget_mb)", status=413)


#: memory one tensor element takes while an answer is encoded as JSON (a Python float in a list, then its text)
JSON_BYTES_PER_VALUE = 64


def check_json_outputs(outputs: list[tuple[str, np.ndarray, bool]], budget: int) -> None:
    """Outputs asked for as JSON go through Python lists and text: refused (413) when that would need more than
    a request's budget (a 2-megapixel frame's logits would take gigabytes); binary answers cost their bytes."""
    for name, array, binary in outputs:
        needed = 0 if binary else array.size * JSON_BYTES_PER_VALUE
        if needed > budget:
            raise ProtocolError(f"output {name!r} of shape {list(array.shape)} as JSON would need "
                                f"{needed / MIB:.1f} MiB to encode, over the limit of {budget / MIB:.1f} MiB a "
                                "request may need (request_budget_mb): ask for it as binary (binary_data: true)",
                                status=413)


def check_call(inputs: dict[str, np.ndarray], outputs: tuple[str, ...], model: ModelConfig,
               budget_bytes: int) -> InferCall:
    """Named request tensors -> an `InferCall`, or a `ProtocolError` naming what does not fit the model: over
    `budget_bytes` (the tensor plus the engine's `bytes_per_pixel` for its pixels) is a 413."""
    max_batch_size = model.max_batch_size
    unknown = sorted(set(inputs) - set(INPUTS))
    if unknown:
        raise ProtocolError(f"unknown input(s) {shown(unknown)}: this model takes one of {sorted(INPUTS)}")
    if len(inputs) != 1:
        raise ProtocolError(f"give exactly one input, 'images' (FP32 NCHW) or 'frames' (UINT8 NHWC); got "
                            f"{shown(sorted(inputs))}")
    unknown = sorted(set(outputs) - set(OUTPUTS))
    if unknown:
        raise ProtocolError(f"unknown output(s) {shown(unknown)}: this model has {list(OUTPUTS)}")
    (name, array), = inputs.items()
    expected = INPUTS[name]["datatype"]
    wanted_dtype = np.float32 if expected == "FP32" else np.uint8
    if array.dtype != wanted_dtype:
        raise ProtocolError(f"input {name!r} must be {expected}, got {datatype_of(array)}")
    if array.ndim != 4:
        raise ProtocolError(f"input {name!r} must be 4-D {INPUTS[name]['layout']}, got shape {list(array.shape)}")
    if name == "images":
        batch, channels, height, width = array.shape
    else:
        batch, height, width, channels = array.shape
    if channels != 3:
        raise ProtocolError(f"input {name!r} ({INPUTS[name]['layout']}) must have 3 channels, got shape "
                            f"{list(array.shape)}")
    if batch < 1:
        raise ProtocolError(f"input {name!r} holds no images (shape {list(array.shape)})")
    if batch > max_batch_size:
        raise ProtocolError(f"input {name!r} holds {batch} images; this model takes at most {max_batch_size} a "
                            "request")
    if min(height, width) < MIN_SIDE:
        raise ProtocolError(f"input {name!r}: images are {height}x{width}, smaller than {MIN_SIDE} pixels a side")
    check_budget(f"input {name!r} of shape {list(array.shape)}",
                 array.nbytes + tensor_pixels(name, array.shape) * model.bytes_per_pixel, budget_bytes)
    if name == "images" and not np.isfinite(array).all():
        raise ProtocolError("input 'images' contains NaN or infinite values")
    return InferCall(name, np.ascontiguousarray(array), tuple(outputs) or OUTPUTS)


def _images_in(calls: list[InferCall]) -> int:
    return sum(call.images for call in calls)


def budget_parts(indices: list[int], calls: list[InferCall], bytes_per_pixel: int,
                 budget_bytes: int) -> list[list[int]]:
    """`indices` of `calls` (in order) split into engine runs that each hold at most `budget_bytes`; a call alone
    over it still runs alone (the ingress's request budget, never above a batch's, keeps that from happening)."""
    parts: list[list[int]] = []
    held = 0
    for index in indices:
        needed = calls[index].memory_bytes(bytes_per_pixel)
        if parts and held + needed <= budget_bytes:
            parts[-1].append(index)
            held += needed
        else:
            parts.append([index])
            held = needed
    return parts


def trim_heap() -> None:
    """Hand glibc's free heap pages back to the OS: Python and NumPy free into malloc's lists, which keep a
    large request's pages otherwise."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        pass


@serve.deployment(ray_actor_options={"num_cpus": 1})
class EngineModel:
    """A replica that owns one `Engine` (ONNX Runtime or TensorRT) and batches requests into it."""

    def __init__(self, model: ModelConfig, trim_above_bytes: int):
        import ray

        from export import load_engine
        from segmenters.device import assigned_device

        self.config = model
        self.trim_above_bytes = trim_above_bytes
        # the GPU Ray gave this replica (CUDA_VISIBLE_DEVICES names it cuda:0 here), or the CPU when it gave none
        gpu_ids = ray.get_gpu_ids()
        device = assigned_device(model.device, gpu_ids)
        options = {}
        if model.path.lower().endswith(".onnx"):
            options.update(threads=model.engine_threads, provider_options=model.provider_options)
            if model.device == "auto" and device.type == "cuda":
                device = "auto"  # ONNX Runtime's own auto: its CUDA provider when that loads, else the CPU
        self.engine = load_engine(model.path, device=device, **options)
        if gpu_ids and self.engine.device == "cpu":
            logging.getLogger("ray.serve").warning(
                "%s: Ray gave this replica GPU %s, but the engine runs on the CPU (%s)", model.deployment_name,
                gpu_ids, self.engine.backend)
        self.metrics = ModelMetrics(model.name, model.version)
        self.node_id = ray.get_runtime_context().get_node_id()  # whose shared-memory segments it can open
        self._batch.set_max_batch_size(model.max_batch_size)
        self._batch.set_batch_wait_timeout_s(model.batch_wait_ms / 1000.0)

    def metadata(self) -> dict:
        """What the ingress reports for this model: spec, precision, backend."""
        return {"spec": self.engine.spec.model_dump(mode="json"), "precision": self.engine.precision,
                "backend": self.engine.backend, "device": self.engine.device, "path": self.config.path}

    def ready(self) -> bool:
        return True

    async def infer(self, call: InferCall) -> dict[str, np.ndarray]:
        if call.source is None and not call.targets:
            return await self._batch(call)
        return await self._infer_through_segments(call)

    async def _infer_through_segments(self, call: InferCall) -> dict:
        """A call whose input is read from, and whose `targets` outputs are written into, shared-memory slices of
        this node: those outputs are answered as `WrittenOutput`s. Slices of another node: `SegmentElsewhere`."""
        slices = ([call.source] if call.source is not None else []) + [target for _, target in call.targets]
        if any(piece.node_id != self.node_id for piece in slices):
            raise SegmentElsewhere(f"{self.config.deployment_name} runs on node {self.node_id}, not on the node of "
                                   "the call's shared memory")
        array = call.array
        if call.source is not None:
            dtype = np.float32 if INPUTS[call.input_name]["datatype"] == "FP32" else np.uint8
            array = np.frombuffer(call.source.read(), dtype).reshape(call.source_shape)
        result = await self._batch(InferCall(call.input_name, array, call.outputs))
        for name, target in call.targets:
            data = np.ascontiguousarray(result[name])
            target.write(data.tobytes(), f"output {name!r}")
            result[name] = WrittenOutput(data.shape, data.dtype, data.nbytes)
        return result

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0, batch_size_fn=_images_in)  # set per model in __init__
    async def _batch(self, calls: list[InferCall]) -> list[dict[str, np.ndarray]]:
        # Calls of one input kind and image size run as one engine batch; other groups run after it.
        groups: dict[tuple, list[int]] = {}
        for index, call in enumerate(calls):
            size = call.array.shape[2:] if call.input_name == "images" else call.array.shape[1:3]
            groups.setdefault((call.input_name, tuple(size)), []).append(index)
        results: list[dict[str, np.ndarray]] = [{} for _ in calls]
        budget = int(self.config.batch_budget_mb * MIB)
        for indices in groups.values():
            for part in budget_parts(indices, calls, self.config.bytes_per_pixel, budget):
                await self._run_part(part, calls, results)
        if max(call.memory_bytes(self.config.bytes_per_pixel) for call in calls) > self.trim_above_bytes:
            await asyncio.to_thread(self._give_memory_back)
        return results

    async def _run_part(self, indices: list[int], calls: list[InferCall],
                        results: list[dict[str, np.ndarray]]) -> None:
        """One engine run over `calls[i]` for `i` in `indices`; each call's slice of the outputs into `results`."""
        group = [calls[i] for i in indices]
        started = time.perf_counter()
        outputs = await asyncio.to_thread(self._run, group)
        self.metrics.observe_batch(sum(c.images for c in group), (time.perf_counter() - started) * 1000.0)
        start = 0
        for i, call in zip(indices, group):
            results[i] = {name: value[start:start + call.images] for name, value in outputs.items()
                          if name in call.outputs}
            start += call.images

    def _give_memory_back(self) -> None:
        """After a large batch: the engine's pool (ONNX Runtime's arena) shrunk, then the C heap trimmed. A failure
        here costs memory, never the batch's answers."""
        try:
            self.engine.release_memory()
        except EngineError as exc:
            logging.getLogger("ray.serve").warning("%s: could not give memory back: %s", self.config.deployment_name,
                                                   exc)
        trim_heap()

    def _run(self, group: list[InferCall]) -> dict[str, np.ndarray]:
        """One group's engine batch. Labels alone come from `segment` (argmax on the engine's device, only uint8
        back); when a call wants the logits they come back and the labels are their argmax."""
        batch = np.concatenate([call.array for call in group])
        frames = group[0].input_name == "frames"
        if not any("logits" in call.outputs for call in group):
            return {"labels": self.engine.segment(batch) if frames else self.engine.labels(batch)}
        logits = self.engine.infer(self.engine.prepare(batch) if frames else batch)
        return {"logits": logits, "labels": logits.argmax(axis=1).astype(self.label_dtype)}

    @property
    def label_dtype(self):
        return label_dtype(self.engine.spec)

    def check_health(self) -> None:
        """Serve calls this periodically; an exception marks the replica unhealthy and Serve replaces it. A tiny
        inference proves the engine (and its GPU, if any) still answers."""
        probe = np.zeros((1, 3, MIN_SIDE, MIN_SIDE), np.float32)
        logits = self.engine.infer(probe)
        if not np.isfinite(logits).all():
            raise RuntimeError(f"engine {self.engine.backend} returned non-finite logits on the health probe")


def deployment_for(model: ModelConfig, trim_above_bytes: int):
    """The bound deployment of one model version, with its replicas, autoscaling and resources."""
    actor_options = {"num_cpus": model.num_cpus}
    if model.num_gpus > 0:
        actor_options["num_gpus"] = model.num_gpus
    if model.resources:
        actor_options["resources"] = dict(model.resources)
    options = {
        "name": model.deployment_name,
        "ray_actor_options": actor_options,
        "max_ongoing_requests": model.max_ongoing_requests,
        "health_check_period_s": model.health_check_period_s,
        "health_check_timeout_s": max(30.0, model.health_check_period_s),
    }
    if model.autoscaling is not None:
        options["autoscaling_config"] = model.autoscaling.model_dump()
    else:
        options["num_replicas"] = model.num_replicas
    return EngineModel.options(**options).bind(model, trim_above_bytes)



class ServeHandleEngine(Engine):
    """A served model version reached through its Serve deployment handle: the `Engine` a monitor running inside
    the cluster holds (no HTTP, no ingress; the replica's batching still merges its calls with everyone's).
    Construct it from a driver or task connected to the cluster."""

    def __init__(self, name: str, version: str, app_name: str = "patchwatch"):
        deployment = ModelConfig.model_construct(name=name, version=version).deployment_name
        try:
            self.handle = serve.get_deployment_handle(deployment, app_name=app_name)
            self.by_value_handle = self.handle.options(_by_reference=False)  # for small calls, as the ingress
            meta = self.handle.metadata.remote().result(timeout_s=60)
        except Exception as exc:
            raise EngineError(f"no served model {name!r} version {version!r} in Serve application {app_name!r}: "
                              f"{exc}") from exc
        self.spec = ModelSpec.model_validate(meta["spec"])
        self.precision, self.device = meta["precision"], meta["device"]
        self.backend = f"serve:{app_name}/{deployment} ({meta['backend']})"

    def _call(self, input_name: str, array: np.ndarray, output: str) -> np.ndarray:
        call = InferCall(input_name, array, (output,))
        handle = self.by_value_handle if call.by_value else self.handle
        return handle.infer.remote(call).result(timeout_s=120)[output]

    def _run(self, images: np.ndarray) -> np.ndarray:
        return self._call("images", images, "logits")

    def _labels(self, images: np.ndarray) -> np.ndarray:
        return self._call("images", images, "labels")  # only the label maps come back

    def _segment_frames(self, frames: np.ndarray) -> np.ndarray:
        return self._call("frames", frames, "labels")  # normalised by the replica
