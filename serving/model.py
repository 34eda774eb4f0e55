"""One Ray Serve deployment per served model version: a replica owns one `Engine` and batches requests into it.

A request reaches the replica as an `InferCall` already checked by the ingress (`check_call`), so the replica
only batches, normalises camera frames from the `ModelSpec` (`Engine.prepare`), runs the engine, and returns
the outputs asked for: logits and/or the label map.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import numpy as np
from ray import serve

from export.engine import Engine, EngineError, label_dtype
from segmenters.spec import ModelSpec
from serving.config import ModelConfig
from serving.metrics import ModelMetrics
from serving.protocol import ProtocolError, datatype_of

#: the OIP inputs a model takes; a request carries exactly one of them
INPUTS = {
    "images": {"datatype": "FP32", "layout": "NCHW", "about": "images normalised by the model spec's mean/std"},
    "frames": {"datatype": "UINT8", "layout": "NHWC", "about": "RGB camera frames 0..255, normalised server-side"},
}
OUTPUTS = ("logits", "labels")
#: smaller images than this make the deepest encoders' feature maps vanish
MIN_SIDE = 32


@dataclass(frozen=True)
class InferCall:
    input_name: str  # "images" or "frames"
    array: np.ndarray
    outputs: tuple[str, ...]

    @property
    def images(self) -> int:
        return int(self.array.shape[0])


def check_call(inputs: dict[str, np.ndarray], outputs: tuple[str, ...], max_batch_size: int,
               max_pixels: int) -> InferCall:
    """Named request tensors -> an `InferCall`, or a `ProtocolError` naming what does not fit the model."""
    unknown = sorted(set(inputs) - set(INPUTS))
    if unknown:
        raise ProtocolError(f"unknown input(s) {unknown}: this model takes one of {sorted(INPUTS)}")
    if len(inputs) != 1:
        raise ProtocolError(f"give exactly one input, 'images' (FP32 NCHW) or 'frames' (UINT8 NHWC); got "
                            f"{sorted(inputs)}")
    unknown = sorted(set(outputs) - set(OUTPUTS))
    if unknown:
        raise ProtocolError(f"unknown output(s) {unknown}: this model has {list(OUTPUTS)}")
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
    if height * width > max_pixels:
        raise ProtocolError(f"input {name!r}: images are {height}x{width} = {height * width} pixels, over the "
                            f"limit of {max_pixels}", status=413)
    if name == "images" and not np.isfinite(array).all():
        raise ProtocolError("input 'images' contains NaN or infinite values")
    return InferCall(name, np.ascontiguousarray(array), tuple(outputs) or OUTPUTS)


def _images_in(calls: list[InferCall]) -> int:
    return sum(call.images for call in calls)


@serve.deployment(ray_actor_options={"num_cpus": 1})
class EngineModel:
    """A replica that owns one `Engine` (ONNX Runtime or TensorRT) and batches requests into it."""

    def __init__(self, model: ModelConfig):
        import ray

        from export import load_engine
        from segmenters.device import assigned_device

        self.config = model
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
        self._batch.set_max_batch_size(model.max_batch_size)
        self._batch.set_batch_wait_timeout_s(model.batch_wait_ms / 1000.0)

    def metadata(self) -> dict:
        """What the ingress reports for this model: spec, precision, backend."""
        return {"spec": self.engine.spec.model_dump(mode="json"), "precision": self.engine.precision,
                "backend": self.engine.backend, "device": self.engine.device, "path": self.config.path}

    def ready(self) -> bool:
        return True

    async def infer(self, call: InferCall) -> dict[str, np.ndarray]:
        return await self._batch(call)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005, batch_size_fn=_images_in)
    async def _batch(self, calls: list[InferCall]) -> list[dict[str, np.ndarray]]:
        # Calls of one input kind and image size run as one engine batch; other groups run after it.
        groups: dict[tuple, list[int]] = {}
        for index, call in enumerate(calls):
            size = call.array.shape[2:] if call.input_name == "images" else call.array.shape[1:3]
            groups.setdefault((call.input_name, tuple(size)), []).append(index)
        results: list[dict[str, np.ndarray]] = [{} for _ in calls]
        for indices in groups.values():
            group = [calls[i] for i in indices]
            started = time.perf_counter()
            outputs = await asyncio.to_thread(self._run, group)
            self.metrics.observe_batch(sum(c.images for c in group), (time.perf_counter() - started) * 1000.0)
            start = 0
            for i, call in zip(indices, group):
                results[i] = {name: value[start:start + call.images] for name, value in outputs.items()
                              if name in call.outputs}
                start += call.images
        return results

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


def deployment_for(model: ModelConfig):
    """The bound deployment of one model version, with its replicas, autoscaling and resources."""
    actor_options = {"num_cpus": model.num_cpus}
    if model.num_gpus > 0:
        actor_options["num_gpus"] = model.num_gpus
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
    return EngineModel.options(**options).bind(model)



class ServeHandleEngine(Engine):
    """A served model version reached through its Serve deployment handle: the `Engine` a monitor running inside
    the cluster holds (no HTTP, no ingress; the replica's batching still merges its calls with everyone's).
    Construct it from a driver or task connected to the cluster."""

    def __init__(self, name: str, version: str, app_name: str = "patchwatch"):
        deployment = ModelConfig.model_construct(name=name, version=version).deployment_name
        try:
            self.handle = serve.get_deployment_handle(deployment, app_name=app_name)
            meta = self.handle.metadata.remote().result(timeout_s=60)
        except Exception as exc:
            raise EngineError(f"no served model {name!r} version {version!r} in Serve application {app_name!r}: "
                              f"{exc}") from exc
        self.spec = ModelSpec.model_validate(meta["spec"])
        self.precision, self.device = meta["precision"], meta["device"]
        self.backend = f"serve:{app_name}/{deployment} ({meta['backend']})"

    def _call(self, input_name: str, array: np.ndarray, output: str) -> np.ndarray:
        return self.handle.infer.remote(InferCall(input_name, array, (output,))).result(timeout_s=120)[output]

    def _run(self, images: np.ndarray) -> np.ndarray:
        return self._call("images", images, "logits")

    def _labels(self, images: np.ndarray) -> np.ndarray:
        return self._call("images", images, "labels")  # only the label maps come back

    def _segment_frames(self, frames: np.ndarray) -> np.ndarray:
        return self._call("frames", frames, "labels")  # normalised by the replica
