"""What a served application is: its models (engine files, batching, replicas) and its front door (address,
API key, limits). The same `ServeConfig` is read by `patchwatch serve --config`, by the application builder
that `serve deploy deploy/serve_config.yaml` imports, and by the KubeRay manifest's `serveConfigV2`."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
ENGINE_SUFFIXES = (".onnx", ".plan", ".engine")
MIB = 1024 * 1024


class ServeConfigError(ValueError):
    """A serve configuration that cannot be run, with the reason."""


class Autoscaling(BaseModel):
    """Ray Serve autoscaling for one model: replicas follow the requests waiting at each."""

    model_config = ConfigDict(extra="forbid")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


class ModelConfig(BaseModel):
    """One served model version: one Ray Serve deployment hosting one `Engine`."""

    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    version: Annotated[str, Field(pattern=NAME_PATTERN)] = "1"
    #: engine file: .onnx (ONNX Runtime) or .plan/.engine (TensorRT, needs num_gpus > 0)
    path: str
    #: images per engine run, and the most one request may carry
    max_batch_size: int = Field(8, ge=1, le=1024)
    #: how long a batch waits for more requests before it runs. 0 (Triton's default queue delay): a lone request
    #: runs at once, and under load the requests that queued while the engine ran form the next batch; a wait
    #: adds itself to every lone request's latency (+5 ms at 5: bench/serve_load.py --batch-wait-ms)
    batch_wait_ms: float = Field(0.0, ge=0, le=10_000)
    num_replicas: int = Field(1, ge=1)
    #: when set, replaces num_replicas
    autoscaling: Autoscaling | None = None
    num_cpus: float = Field(1.0, ge=0)
    #: custom Ray resources each replica needs (`ray start --resources`): places replicas on the nodes that offer
    #: them, e.g. one replica per node that has {"model_slot": 1}
    resources: dict[str, float] = Field(default_factory=dict)
    #: > 0 gives each replica (a share of) a GPU; fractions let replicas share one
    num_gpus: float = Field(0.0, ge=0)
    #: where the engine runs inside its replica: auto (the GPU Ray gave it, else the CPU), cpu, or cuda
    #: (refused at start when Ray gave it no GPU)
    device: str = "auto"
    #: ONNX Runtime CUDA provider options (cudnn_conv_algo_search, gpu_mem_limit, ...); fp32 keeps TF32 off
    provider_options: dict[str, str | int | float] = Field(default_factory=dict)
    #: ONNX Runtime intra-op threads (default: the replica's CPUs, `engine_threads`)
    threads: int | None = Field(None, ge=1)
    max_ongoing_requests: int = Field(32, ge=1)
    health_check_period_s: float = Field(10.0, gt=0)
    #: memory the engine works in per input pixel: the float32 input (12 B), the network's activations and its
    #: logits (4 B a class). Peaks measured on CamVid (11 classes) through ONNX Runtime on the CPU: U-Net 271 B,
    #: LR-ASPP 134 B; the request and batch budgets count it
    bytes_per_pixel: int = Field(320, ge=1)
    #: memory one engine run of a replica may hold (its calls' tensors plus `bytes_per_pixel` for their pixels);
    #: a batch over it runs in parts, one after another
    batch_budget_mb: float = Field(2048.0, gt=0)

    @property
    def engine_threads(self) -> int:
        """ONNX Runtime's intra-op threads in a replica: `threads` when set, else the CPUs Ray reserved for it
        (at least one). ONNX Runtime's own default is every core of the node, which puts a replica granted one CPU
        on all of them: beside other replicas, the proxy or a monitor, it takes their cores."""
        return self.threads or max(1, int(self.num_cpus))

    @field_validator("path")
    @classmethod
    def _engine_file(cls, value: str) -> str:
        if Path(value).suffix.lower() not in ENGINE_SUFFIXES:
            raise ValueError(f"{value!r} is not an engine file ({', '.join(ENGINE_SUFFIXES)})")
        return value

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        from segmenters.device import DeviceError, device_name

        try:
            return device_name(value)  # the form only: which GPU is Ray's to say
        except DeviceError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _plans_need_gpus(self) -> ModelConfig:
        if Path(self.path).suffix.lower() in (".plan", ".engine") and self.num_gpus <= 0:
            raise ValueError(f"model {self.name!r}: a TensorRT plan needs num_gpus > 0")
        if self.device.startswith("cuda") and self.num_gpus <= 0:
            raise ValueError(f"model {self.name!r}: device {self.device!r} needs num_gpus > 0 (Ray gives replicas "
                             "their GPUs)")
        return self

    @property
    def deployment_name(self) -> str:
        return f"{self.name}_v{self.version}"


class ServeConfig(BaseModel):
    """The application: models plus the front door's address, key and limits."""

    model_config = ConfigDict(extra="forbid")
    models: list[ModelConfig] = Field(min_length=1)
    #: where the Serve HTTP proxy listens (must agree with Serve's http_options when deployed from YAML)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    #: the Open Inference Protocol over gRPC (inference.GRPCInferenceService) on `host:grpc_port`, served by the
    #: ingress replicas; off unless set, so a service opens no port it was not asked for (Triton's is 8001)
    grpc_port: int | None = Field(None, ge=1, le=65535)
    #: HTTP served by the ingress replicas themselves on `host:direct_port` (`serving.direct_http`): the same
    #: routes as `port`, without the hop through Serve's proxy, for clients on the ingress's node; off unless set
    direct_port: int | None = Field(None, ge=1, le=65535)
    #: environment variable holding the API key; requests then need `Authorization: Bearer <key>`
    api_key_env: str | None = None
    #: request bodies above this are refused with 413 before they are read
    max_body_mb: float = Field(64.0, gt=0)
    #: memory one request may need: its decoded image or tensors plus the engine's `bytes_per_pixel` for their
    #: pixels. Over it, 413 before anything is decoded (an image's size is read from its header). The default
    #: takes a 2048x1536 upload for a U-Net-class model and refuses 4K (see `memory_bound_bytes`)
    request_budget_mb: float = Field(1024.0, gt=0)
    #: after a request that needed more memory than this, the ingress and the replica give freed memory back to
    #: the OS (ONNX Runtime's arena shrunk, then glibc's free lists trimmed)
    trim_above_mb: float = Field(64.0, ge=0)
    #: an inference that takes longer is answered 503
    request_timeout_s: float = Field(30.0, gt=0)
    #: a request body that has not fully arrived this long after the request began is answered 408 (a stalled or
    #: trickled upload must not hold the ingress)
    body_timeout_s: float = Field(10.0, gt=0)
    ingress_replicas: int = Field(1, ge=1)
    #: where Serve runs its HTTP proxies: on every node (a load balancer in front spreads clients over them), or on
    #: the head alone (the nodes share one machine and cannot all bind `port`, or clients reach only the head).
    #: A Serve config file's own `proxy_location` is taken when its args name none
    proxy_location: Literal["EveryNode", "HeadOnly"] = "EveryNode"

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        seen = set()
        for model in self.models:
            key = (model.name, model.version)
            if key in seen:
                raise ValueError(f"model {model.name!r} version {model.version!r} is listed twice")
            seen.add(key)
        for model in self.models:
            if model.batch_budget_mb < self.request_budget_mb:
                raise ValueError(f"model {model.name!r}: batch_budget_mb {model.batch_budget_mb} is below "
                                 f"request_budget_mb {self.request_budget_mb}: one request must fit one batch")
        ports = {"port": self.port, "grpc_port": self.grpc_port, "direct_port": self.direct_port}
        taken = [f"{name} {number}" for name, number in ports.items()
                 if number is not None and list(ports.values()).count(number) > 1]
        if taken:
            raise ValueError(f"{' and '.join(taken)}: each of port, grpc_port and direct_port needs a port of its own")
        if not is_loopback(self.host) and not self.api_key_env:
            raise ValueError(f"host {self.host!r} is not loopback: set api_key_env (the environment variable that "
                             "holds the API key); an open inference endpoint is refused")
        return self

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * MIB)

    @property
    def request_budget_bytes(self) -> int:
        return int(self.request_budget_mb * MIB)

    @property
    def trim_above_bytes(self) -> int:
        return int(self.trim_above_mb * MIB)

    def memory_bound_bytes(self, concurrent: int) -> int:
        """How far the service's memory (proxy, ingress and replicas together) can rise above its idle RSS with
        `concurrent` requests in flight: each holds at most its body and its request budget (decoded image or
        tensors plus the engine's memory for its pixels; a batch's engine memory is its calls'). With the
        defaults, 8 worst-case uploads: 8 x (64 + 1024) MiB = 8.5 GiB."""
        return concurrent * (self.max_body_bytes + self.request_budget_bytes)

    def api_key(self) -> str | None:
        """The API key from the environment, or None when auth is off. Raises if the variable is named but empty."""
        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env, "")
        if not key:
            raise ServeConfigError(f"api_key_env names ${self.api_key_env}, but it is unset or empty")
        return key

    def default_versions(self) -> dict[str, str]:
        """Model name -> the version served when a request names none: the highest (numerically if numeric)."""
        versions: dict[str, list[str]] = {}
        for model in self.models:
            versions.setdefault(model.name, []).append(model.version)
        return {name: max(found, key=version_order) for name, found in versions.items()}


def version_order(version: str) -> tuple[int, int, str]:
    return (1, int(version), "") if version.isdigit() else (0, 0, version)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_serve_config(path: str | Path) -> ServeConfig:
    """A YAML ServeConfig: either the config itself, or a Serve config file whose first application's `args`
    is one (so `patchwatch serve --config deploy/serve_config.yaml` runs what `serve deploy` would)."""
    from pydantic import ValidationError

    data = yaml.safe_load(Path(path).read_text())
    if isinstance(data, dict) and "applications" in data:
        location = data.get("proxy_location")
        data = data["applications"][0].get("args", {})
        if location is not None and isinstance(data, dict):
            data = {"proxy_location": location, **data}
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as exc:
        raise ServeConfigError(f"{path}: {exc}") from exc
