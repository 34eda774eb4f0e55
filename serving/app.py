"""The Ray Serve application: an HTTP ingress speaking the Open Inference Protocol (KServe v2 REST, with the
binary tensor data extension) in front of one `EngineModel` deployment per served model version.

Routes
  GET  /v2                                          server metadata
  GET  /v2/health/live, /v2/health/ready             server health (never need the API key)
  GET  /v2/models/{name}[/versions/{v}]             model metadata, with the model's `ModelSpec`
  GET  /v2/models/{name}[/versions/{v}]/ready       model readiness
  POST /v2/models/{name}[/versions/{v}]/infer       inference: JSON tensors or the binary extension
  POST /v2/models/{name}[/versions/{v}]/segment     an image upload -> label PNG, overlay or class areas
  GET  /metrics                                      Prometheus text: the patchwatch and Serve families
  POST /v2/repository/index                          model repository: every version, READY or UNAVAILABLE
  POST /v2/repository/models/{name}/load|unload      a model's deployments scaled back up / to zero
  GET  /v2/systemsharedmemory[/region/{r}]/status     shared-memory regions registered (serving.shared_memory)
  POST /v2/systemsharedmemory/region/{r}/register     a POSIX shm segment of this node as region r
  POST /v2/systemsharedmemory[/region/{r}]/unregister one region, or all

Every error is `{"error": "..."}` with a 4xx/5xx status; nothing a client sends can stop the replica.
"""

# No `from __future__ import annotations` here: FastAPI reads the route methods' annotations at class
# definition, and Serve's class ingress loses string annotations (a `Request` becomes a query parameter).
import asyncio
import hmac
import logging
import time
import zlib
from importlib.metadata import PackageNotFoundError, version as package_version

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from segmenters.spec import ModelSpec
from serving.config import ModelConfig, ServeConfig
from serving.images import check_upload_type, choose_output, class_areas, decode_upload, label_png, overlay_image
from serving.metrics import IngressMetrics, exported_families, node_metrics_url
from serving.model import INPUTS, OUTPUTS, InferCall, check_call, check_json_outputs, deployment_for, trim_heap
from serving.protocol import (HEADER_LENGTH, ProtocolError, decode_infer_request, encode_infer_response, error_body,
                              shown)
from serving.repository import ModelRepository, check_load_request, parse_request
from serving.shared_memory import SegmentElsewhere, SharedMemoryRegistry

logger = logging.getLogger("ray.serve")

SERVER_NAME = "patchwatch"
EXTENSIONS = ["binary_tensor_data", "system_shared_memory", "patchwatch_segment", "patchwatch_metrics"]
#: the health endpoints answer without the API key, so orchestrators can probe them
OPEN_PATHS = ("/v2/health/live", "/v2/health/ready")
REASONS = {400: "bad_request", 401: "unauthorized", 404: "not_found", 408: "timeout", 413: "too_large",
           415: "unsupported_media_type", 500: "internal", 503: "unavailable"}
#: Content-Encoding -> zlib's window bits for it (tritonclient's request_compression_algorithm sends these)
DECODINGS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS, "identity": None}
READY_TIMEOUT_S = 2.0
#: what a read route answers: HEAD wherever GET (the same status and headers, no body)
READ_METHODS = ["GET", "HEAD"]

api = FastAPI(title="patchwatch", description="Open Inference Protocol for semantic-segmentation engines",
              docs_url=None, redoc_url=None, openapi_url=None)


def error_response(message: str, status: int, headers: dict | None = None) -> Response:
    return Response(error_body(message), status_code=status, media_type="application/json", headers=headers)


def _decompressed(body: bytes, encoding: str, limit: int) -> bytes:
    """A gzip or deflate body inflated, never past `limit` bytes (a small bomb stays small)."""
    inflater = zlib.decompressobj(DECODINGS[encoding])
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ProtocolError(f"the request body is not valid {encoding} data: {exc}") from None
    if len(data) > limit or inflater.unconsumed_tail:
        raise ProtocolError(f"the request body inflates past the limit of {limit} bytes", status=413)
    if not inflater.eof or inflater.unused_data:
        raise ProtocolError(f"the request body is not one whole {encoding} stream (cut off, or data after its end)")
    return data


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    message = {404: f"no route {request.method} {request.url.path}",
               405: f"method {request.method} not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
    return error_response(message, exc.status_code, exc.headers)  # a 405 keeps its Allow header


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    return error_response(f"bad request: {exc.errors()}", 400)


def server_version() -> str:
    try:
        return package_version("patchwatch")
    except PackageNotFoundError:
        return "0+unknown"


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=256)
@serve.ingress(api)
class InferenceServer:
    """The front door: decodes and checks requests, routes them to a model's deployment, encodes answers."""

    def __init__(self, config: ServeConfig, models: dict[str, DeploymentHandle]):
        self.config = config
        self.api_key = config.api_key()
        self.models: dict[tuple[str, str], tuple[ModelConfig, DeploymentHandle]] = {
            (m.name, m.version): (m, models[m.deployment_name]) for m in config.models}
        self.default_versions = config.default_versions()
        #: the same handles, sending calls by value over the replicas' gRPC channel (`InferCall.by_value`)
        self.by_value_handles = {key: handle.options(_by_reference=False) for key, (_, handle) in self.models.items()}
        self.metrics = IngressMetrics()
        self._metadata: dict[tuple[str, str], dict] = {}
        self.repository = ModelRepository(self.models)
        self.shared_memory = SharedMemoryRegistry(config.max_body_bytes)
        self.node_id = ray.get_runtime_context().get_node_id()  # whose shared-memory segments clients register
        if config.grpc_port is not None:  # the OIP over gRPC, on this replica's event loop
            from serving.grpc_service import start_grpc_server

            self.grpc_server = start_grpc_server(self, config.host, config.grpc_port, config.max_body_bytes)
        if config.direct_port is not None:  # HTTP without the hop through Serve's proxy, on this event loop too
            from serving.direct_http import start_direct_http_server

            self.direct_server = start_direct_http_server(api, config.host, config.direct_port)

    # ------------------------------------------------------------------------------------------ routes

    @api.api_route("/v2", methods=READ_METHODS)
    async def server_metadata(self, request: Request) -> Response:
        return await self._answer(request, "server_metadata", None, self._server_metadata)

    @api.api_route("/v2/health/live", methods=READ_METHODS)
    async def live(self, request: Request) -> Response:
        return await self._answer(request, "live", None, self._live)

    @api.api_route("/v2/health/ready", methods=READ_METHODS)
    async def server_ready(self, request: Request) -> Response:
        return await self._answer(request, "ready", None, self._server_ready)

    # Each model route answers with and without /versions/{version}; the version is read from the path.
    @api.api_route("/v2/models/{name}", methods=READ_METHODS)
    @api.api_route("/v2/models/{name}/versions/{version}", methods=READ_METHODS)
    async def model_metadata(self, name: str, request: Request) -> Response:
        return await self._answer(request, "model_metadata", name, self._model_metadata)

    @api.api_route("/v2/models/{name}/ready", methods=READ_METHODS)
    @api.api_route("/v2/models/{name}/versions/{version}/ready", methods=READ_METHODS)
    async def model_ready(self, name: str, request: Request) -> Response:
        return await self._answer(request, "model_ready", name, self._model_ready)

    @api.post("/v2/models/{name}/infer")
    @api.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(self, name: str, request: Request) -> Response:
        return await self._answer(request, "infer", name, self._infer)

    @api.post("/v2/models/{name}/segment")
    @api.post("/v2/models/{name}/versions/{version}/segment")
    async def segment(self, name: str, request: Request) -> Response:
        return await self._answer(request, "segment", name, self._segment)

    @api.api_route("/metrics", methods=READ_METHODS)
    async def prometheus(self, request: Request) -> Response:
        return await self._answer(request, "metrics", None, self._prometheus)

    @api.post("/v2/repository/index")
    async def repository_index(self, request: Request) -> Response:
        return await self._answer(request, "repository_index", None, self._repository_index)

    @api.post("/v2/repository/models/{name}/load")
    async def repository_load(self, name: str, request: Request) -> Response:
        return await self._answer(request, "repository_load", name, self._repository_load)

    @api.post("/v2/repository/models/{name}/unload")
    async def repository_unload(self, name: str, request: Request) -> Response:
        return await self._answer(request, "repository_unload", name, self._repository_unload)

    # The system shared-memory extension; `name` is the region's, never a model's.
    @api.api_route("/v2/systemsharedmemory/status", methods=READ_METHODS)
    @api.api_route("/v2/systemsharedmemory/region/{region}/status", methods=READ_METHODS)
    async def shared_memory_status(self, request: Request) -> Response:
        return await self._answer(request, "shared_memory_status", None, self._shared_memory_status)

    @api.post("/v2/systemsharedmemory/region/{region}/register")
    async def shared_memory_register(self, region: str, request: Request) -> Response:
        return await self._answer(request, "shared_memory_register", None, self._shared_memory_register)

    @api.post("/v2/systemsharedmemory/unregister")
    @api.post("/v2/systemsharedmemory/region/{region}/unregister")
    async def shared_memory_unregister(self, request: Request) -> Response:
        return await self._answer(request, "shared_memory_unregister", None, self._shared_memory_unregister)

    # ----------------------------------------------------------------------------------------- handling

    async def _answer(self, request: Request, endpoint: str, name: str | None, handler) -> Response:
        """Authorise, run the handler, turn any failure into an `{"error"}` answer, and count it."""
        started = time.perf_counter()
        reason = None
        version = request.path_params.get("version")
        try:
            self._authorize(request)
            response = await handler(request, name, version)
            if getattr(request.state, "memory_bytes", 0) > self.config.trim_above_bytes:
                await asyncio.to_thread(trim_heap)  # a large request's freed pages go back to the OS
        except ProtocolError as exc:
            headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
            response = error_response(exc.message, exc.status, headers)
            reason = REASONS.get(exc.status)
        except Exception as exc:  # a bug must cost one request, never the replica
            logger.exception("%s %s failed", request.method, request.url.path)
            response = error_response(f"internal error: {type(exc).__name__}: {exc}", 500)
            reason = "internal"
        # a label per served model only: names clients make up must not grow the metric series
        label = name if name in self.default_versions else ("unknown" if name else None)
        self.metrics.record(label, endpoint, response.status_code, (time.perf_counter() - started) * 1000.0, reason)
        return response

    def _authorize(self, request: Request) -> None:
        if self.api_key is None or request.url.path in OPEN_PATHS:
            return
        self.check_api_key(request.headers.get("authorization", ""))

    def check_api_key(self, authorization: str) -> None:
        """`authorization` (the REST header, or the gRPC metadata of that name) against the API key, if any."""
        if self.api_key is None:
            return
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ProtocolError("this server needs an API key: send 'Authorization: Bearer <key>'", status=401)
        if not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ProtocolError("the API key is not valid", status=401)

    def _model(self, name: str, version: str | None, loaded: bool = True) -> tuple[ModelConfig, DeploymentHandle]:
        """The model version a request names; with `loaded`, refused (503) while the repository has it unloaded."""
        if name not in self.default_versions:
            known = ", ".join(sorted(self.default_versions)) or "none"
            raise ProtocolError(f"unknown model {shown(name)} (this server has: {known})", status=404)
        version = version or self.default_versions[name]
        if (name, version) not in self.models:
            raise ProtocolError(f"model {name!r} has no version {shown(version)} (versions: "
                                f"{', '.join(self._versions(name))})", status=404)
        if loaded:
            self.repository.check_loaded(self.models[(name, version)][0])
        return self.models[(name, version)]

    def _versions(self, name: str) -> list[str]:
        return [v for (n, v) in self.models if n == name]

    async def _body(self, request: Request) -> bytes:
        """The request body, whole and decoded: refused over the size limit (before and after decompression),
        when it does not arrive within `body_timeout_s`, or in an encoding other than gzip or deflate."""
        limit = self.config.max_body_bytes
        encoding = (request.headers.get("content-encoding") or "identity").strip().lower()
        if encoding not in DECODINGS:
            raise ProtocolError(f"Content-Encoding {shown(encoding)} is not supported (gzip, deflate or none)",
                                status=415)
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise ProtocolError(f"Content-Length {shown(declared)} is not a number")
            if int(declared) > limit:
                raise ProtocolError(f"request body is {int(declared)} bytes, over the limit of {limit}", status=413)
        try:
            body = await asyncio.wait_for(self._read_body(request, limit), timeout=self.config.body_timeout_s)
        except asyncio.TimeoutError:
            raise ProtocolError(f"the request body did not arrive within {self.config.body_timeout_s} s",
                                status=408) from None
        if DECODINGS[encoding] is not None:
            body = _decompressed(body, encoding, limit)
        if not body:
            raise ProtocolError("request body is empty")
        return body

    @staticmethod
    async def _read_body(request: Request, limit: int) -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ProtocolError(f"request body is over the limit of {limit} bytes", status=413)
            chunks.append(chunk)
        return b"".join(chunks)

    def through_segments(self, call: InferCall, input_regions: dict[str, dict],
                         output_regions: dict[str, dict]) -> InferCall:
        """`call` with its shared-memory input and outputs as slices the replica reads and writes itself."""
        if not input_regions and not output_regions:
            return call
        source = None
        for name, parameters in input_regions.items():  # one input a call (check_call)
            source = self.shared_memory.segment_slice(parameters, f"input {shown(name)}", self.node_id)
        targets = {name: self.shared_memory.segment_slice(parameters, f"output {shown(name)}", self.node_id)
                   for name, parameters in output_regions.items()}
        return call.through_segments(source, targets)

    async def _call(self, model: ModelConfig, handle: DeploymentHandle, call: InferCall) -> dict:
        """Run a call on the model's replicas; a replica on another node than the call's shared memory gets the
        data instead (and the ingress writes the outputs)."""
        if call.source is not None or call.targets:
            try:
                return await self._send(model, handle, call.in_transit())
            except SegmentElsewhere:
                call = call.with_data()
        return await self._send(model, handle, call)

    async def _send(self, model: ModelConfig, handle: DeploymentHandle, call: InferCall) -> dict:
        """One call to the model's replicas. Inference is idempotent, so a call whose replica died under it is
        sent once more (to a live or replacement replica) before the client sees an error."""
        if call.by_value:
            handle = self.by_value_handles[(model.name, model.version)]
        for attempt in (1, 2):
            try:
                return await asyncio.wait_for(handle.infer.remote(call), timeout=self.config.request_timeout_s)
            except asyncio.TimeoutError:
                raise ProtocolError(f"model {model.name!r} did not answer within {self.config.request_timeout_s} s",
                                    status=503) from None
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                logger.warning("replica of %s died during a call (attempt %d): %s", model.deployment_name, attempt,
                               exc)
                if attempt == 2:
                    raise ProtocolError(f"model {model.name!r}: replica unavailable ({type(exc).__name__}); "
                                        "retry shortly", status=503) from None
        raise AssertionError("unreachable")

    async def _spec_metadata(self, model: ModelConfig, handle: DeploymentHandle) -> dict:
        key = (model.name, model.version)
        if key not in self._metadata:
            try:
                self._metadata[key] = await asyncio.wait_for(handle.metadata.remote(),
                                                             timeout=self.config.request_timeout_s)
            except asyncio.TimeoutError:
                raise ProtocolError(f"model {model.name!r} is not ready (no replica answered)", status=503) from None
        return self._metadata[key]

    # ---------------------------------------------------------------------------------------- endpoints

    async def _server_metadata(self, request, name, version) -> Response:
        return JSONResponse(self.describe_server())

    def describe_server(self) -> dict:
        return {"name": SERVER_NAME, "version": server_version(), "extensions": EXTENSIONS}

    async def _live(self, request, name, version) -> Response:
        return JSONResponse({"live": True})

    async def _ping(self, handle: DeploymentHandle) -> bool:
        try:
            return bool(await asyncio.wait_for(handle.ready.remote(), timeout=READY_TIMEOUT_S))
        except Exception:
            return False

    async def _server_ready(self, request, name, version) -> Response:
        loaded = {key: handle for key, (model, handle) in self.models.items() if self.repository.is_loaded(model)}
        results = await asyncio.gather(*(self._ping(handle) for handle in loaded.values()))
        waiting = [f"{n}/{v}" for (n, v), ok in zip(loaded, results) if not ok]
        if waiting:
            raise ProtocolError(f"not ready: no replica of {', '.join(waiting)} answered", status=400)
        return JSONResponse({"ready": True})

    async def _model_ready(self, request, name, version) -> Response:
        model, handle = self._model(name, version, loaded=False)
        if not self.repository.is_loaded(model):  # a 4xx is "not ready" to OIP clients
            raise ProtocolError(f"model {name!r} version {model.version!r} is not ready: it is unloaded", status=400)
        if not await self._ping(handle):
            raise ProtocolError(f"model {name!r} version {model.version!r} is not ready", status=400)
        return JSONResponse({"name": name, "version": model.version, "ready": True})

    async def _model_metadata(self, request, name, version) -> Response:
        return JSONResponse(await self.describe_model(name, version))

    async def describe_model(self, name: str, version: str | None) -> dict:
        """A model version's OIP metadata (REST and gRPC), with how to use it and its `ModelSpec`."""
        model, handle = self._model(name, version)
        meta = await self._spec_metadata(model, handle)
        spec = ModelSpec.model_validate(meta["spec"])
        label_type = "UINT8" if spec.num_classes <= 256 else "INT32"
        platform = "tensorrt_plan" if meta["backend"].startswith("tensorrt") else "onnxruntime_onnx"
        return {
            "name": name,
            "versions": self._versions(name),
            "platform": platform,
            "inputs": [
                {"name": "images", "datatype": "FP32", "shape": [-1, 3, -1, -1]},
                {"name": "frames", "datatype": "UINT8", "shape": [-1, -1, -1, 3]},
            ],
            "outputs": [
                {"name": "logits", "datatype": "FP32", "shape": [-1, spec.num_classes, -1, -1]},
                {"name": "labels", "datatype": label_type, "shape": [-1, -1, -1]},
            ],
            # Beyond the protocol's fields: how to use this model, for clients that read it
            "parameters": {"version": model.version, "precision": meta["precision"], "backend": meta["backend"],
                           "device": meta.get("device", "cpu"), "max_batch_size": model.max_batch_size,
                           "inputs": "send exactly one: " + "; ".join(f"{k}: {v['about']}" for k, v in INPUTS.items())},
            "model_spec": meta["spec"],
        }

    async def _infer(self, request: Request, name: str, version: str | None) -> Response:
        model, handle = self._model(name, version)
        header_length = request.headers.get(HEADER_LENGTH)
        content_type = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
        if header_length is None and content_type not in ("", "application/json"):
            raise ProtocolError(f"Content-Type {content_type!r}: an inference request is JSON (application/json), "
                                f"or JSON then binary tensors with the {HEADER_LENGTH} header", status=415)
        body = await self._body(request)
        parsed = await asyncio.to_thread(decode_infer_request, body, header_length, self.shared_memory)
        wanted = tuple(o.name for o in parsed.outputs) if parsed.outputs is not None else OUTPUTS
        # output regions are checked as their slices are made, before the engine runs
        output_regions = {o.name: o.shared_memory for o in parsed.outputs or [] if o.shared_memory is not None}
        call = check_call(parsed.inputs, wanted, model, self.config.request_budget_bytes)
        request.state.memory_bytes = call.memory_bytes(model.bytes_per_pixel)
        result = await self._call(model, handle, self.through_segments(call, parsed.input_regions, output_regions))
        if parsed.outputs is None:
            as_binary = {out: parsed.binary_output for out in OUTPUTS}
        else:
            as_binary = {o.name: o.binary for o in parsed.outputs}
        outputs = [(out, result[out], as_binary[out]) for out in wanted]
        in_region = await asyncio.to_thread(self._write_to_regions, parsed.outputs or [], result)
        check_json_outputs([o for o in outputs if o[0] not in in_region], self.config.request_budget_bytes)
        body, headers = await asyncio.to_thread(encode_infer_response, name, model.version, outputs, parsed.id,
                                                in_shared_memory=in_region)
        return Response(body, headers=headers)

    async def _segment(self, request: Request, name: str, version: str | None) -> Response:
        model, handle = self._model(name, version)
        check_upload_type(request.headers.get("content-type"))
        output = choose_output(request.query_params.get("output"), request.headers.get("accept"))
        body = await self._body(request)
        rgb = await asyncio.to_thread(decode_upload, body, model, self.config.request_budget_bytes)
        call = check_call({"frames": rgb[None]}, ("labels",), model, self.config.request_budget_bytes)
        request.state.memory_bytes = call.memory_bytes(model.bytes_per_pixel)
        labels = (await self._call(model, handle, call))["labels"][0]
        spec = ModelSpec.model_validate((await self._spec_metadata(model, handle))["spec"])
        headers = {"X-Model-Name": name, "X-Model-Version": model.version}
        if output == "labels":
            return Response(await asyncio.to_thread(label_png, labels, spec), media_type="image/png",
                            headers=headers)
        if output == "overlay":
            jpeg = "image/jpeg" in (request.headers.get("accept") or "").lower()
            data = await asyncio.to_thread(overlay_image, rgb, labels, spec, jpeg)
            return Response(data, media_type="image/jpeg" if jpeg else "image/png", headers=headers)
        return JSONResponse({"model_name": name, "model_version": model.version, **class_areas(labels, spec)},
                            headers=headers)

    async def _prometheus(self, request, name, version) -> Response:
        import aiohttp

        url = node_metrics_url()
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
                async with session.get(url) as answer:
                    text = await answer.text()
        except Exception as exc:
            raise ProtocolError(f"the node's metrics agent at {url} did not answer: {exc}", status=503) from None
        return PlainTextResponse(exported_families(text), media_type="text/plain; version=0.0.4")

    def _write_to_regions(self, requested: list, result: dict) -> dict[str, dict]:
        """Outputs the client placed in shared-memory regions, written there (unless the replica did): name -> the
        answer's parameters."""
        return {out.name: self.shared_memory.answer_parameters(out.shared_memory, result[out.name],
                                                               f"output {out.name!r}")
                for out in requested if out.shared_memory is not None}

    async def _shared_memory_status(self, request, name, version) -> Response:
        return JSONResponse(self.shared_memory.status(request.path_params.get("region")))

    async def _shared_memory_register(self, request, name, version) -> Response:
        registration = parse_request(await self._body(request), "shared-memory registration")
        await self.register_region(request.path_params["region"], registration)
        return JSONResponse({})

    async def register_region(self, region: str, registration) -> None:
        """A shared-memory region registered with this replica (REST and gRPC alike)."""
        if self.config.ingress_replicas > 1:
            raise ProtocolError("system shared memory needs ingress_replicas: 1 (a region lives in the ingress "
                                "replica that registered it)")
        await asyncio.to_thread(self.shared_memory.register, region, registration)

    async def _shared_memory_unregister(self, request, name, version) -> Response:
        self.shared_memory.unregister(request.path_params.get("region"))
        return JSONResponse({})

    async def _repository_request(self, request: Request, what: str) -> dict:
        """A repository call's JSON body; tritonclient sends the index call with none."""
        empty = request.headers.get("content-length", "0") == "0" and "transfer-encoding" not in request.headers
        return parse_request(b"" if empty else await self._body(request), what)

    async def _repository_index(self, request, name, version) -> Response:
        ready_only = (await self._repository_request(request, "index")).get("ready") is True
        return JSONResponse(await self.repository.index(ready_only))

    async def _repository_load(self, request, name, version) -> Response:
        check_load_request(await self._repository_request(request, "load"))
        await self.repository.load(name)
        return JSONResponse({})

    async def _repository_unload(self, request, name, version) -> Response:
        await self._repository_request(request, "unload")  # unload_dependents: a model here has none
        await self.repository.unload(name)
        return JSONResponse({})


def build_app(config: ServeConfig):
    """The Serve application: the ingress bound to one deployment per model version."""
    models = {model.deployment_name: deployment_for(model, config.trim_above_bytes) for model in config.models}
    return InferenceServer.options(num_replicas=config.ingress_replicas).bind(config, models)


def app_builder(args: dict):
    """`import_path: serving.app:app_builder` for `serve deploy` and KubeRay: `args` is a `ServeConfig`."""
    return build_app(ServeConfig.model_validate(args))
