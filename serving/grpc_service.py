"""The Open Inference Protocol over gRPC: `inference.GRPCInferenceService` (ServerLive, ServerReady, ModelReady,
ServerMetadata, ModelMetadata, ModelInfer with typed `contents` or `raw_input_contents`, and the system
shared-memory extension: SystemSharedMemoryStatus/Register/Unregister, and inputs and outputs placed in a region by
their `shared_memory_region` parameters), served by a grpc.aio server inside each ingress replica, on
`ServeConfig.host:grpc_port`. Regions are the ingress replica's one registry: one registered over REST serves gRPC
requests too.

The protocol's own generated code is the one the stock client ships (`tritonclient.grpc.service_pb2[_grpc]`), so
`tritonclient.grpc.InferenceServerClient` works unchanged. Requests go through the same checks as the REST route
(`serving.protocol`'s shape and binary-size checks, `serving.model.check_call`, the ingress's model lookup, API
key and replica calls); a `ProtocolError` becomes the gRPC status of its HTTP status, with the same message (cut
to `MAX_ERROR_CHARS`: a status's message travels in metadata, which clients cap). Request bytes are parsed in the
RPC, not by gRPC, so bytes that are no message get INVALID_ARGUMENT saying so rather than UNKNOWN.

Why not Ray Serve's gRPC proxy (`serve.start(grpc_options=...)`, tried on Ray 2.60): it pickles each request
message to the replica, and tritonclient's generated messages name their module `grpc_service_pb2`, which does not
import, so every RPC fails with UNKNOWN "Can't pickle <class 'grpc_service_pb2.ServerLiveRequest'>"; it binds
`[::]:port` (every interface, `ray.serve._private.grpc_util.start_grpc_server`) whatever `http_options.host` says,
so a service kept on 127.0.0.1 without an API key would answer from the network; and it adds a proxy -> ingress hop.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from serving.config import ModelConfig
from serving.model import OUTPUTS, InferCall, check_call
from serving.protocol import (DATATYPES, ProtocolError, _from_binary, _from_shared_memory, _shape, _shaped,
                              datatype_of, error_text, shown)
from serving.shared_memory import REGION, SharedMemoryRegistry

logger = logging.getLogger("ray.serve")

#: a `ProtocolError`'s HTTP status -> the gRPC status a client gets
STATUS_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
                404: grpc.StatusCode.NOT_FOUND, 408: grpc.StatusCode.DEADLINE_EXCEEDED,
                413: grpc.StatusCode.RESOURCE_EXHAUSTED, 415: grpc.StatusCode.INVALID_ARGUMENT,
                503: grpc.StatusCode.UNAVAILABLE}
#: the typed `InferTensorContents` field that carries each datatype (FP16 travels only as raw bytes)
CONTENTS_FIELDS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
                   "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
                   "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
                   "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}
#: the RPCs that answer without the API key, as the REST health routes do
OPEN_METHODS = ("ServerLive", "ServerReady")
#: the request metadata that carries the API key: the REST header's name (gRPC metadata keys are lower case)
AUTH_METADATA = "authorization"
#: gRPC's own limit, -1: none (an answer is as large as the request's batch makes it)
UNLIMITED = -1
#: the service, as the protocol's own descriptor defines it
SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
#: the RPCs served (the others, e.g. the repository and CUDA shared memory, answer UNIMPLEMENTED from gRPC itself)
SERVED_METHODS = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
                  "SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister")


@dataclass(frozen=True)
class Undecodable:
    """Request bytes that are not their method's message: the RPC answers INVALID_ARGUMENT saying so (gRPC's own
    deserializer would fail the call with UNKNOWN, a server error)."""

    message_type: str
    error: str


def grpc_status(error: ProtocolError) -> grpc.StatusCode:
    return STATUS_CODES.get(error.status, grpc.StatusCode.INTERNAL)


def parameter_values(parameters) -> dict:
    """A protobuf map of `InferParameter`s as plain values (what `serving.shared_memory` reads)."""
    values = {}
    for key, value in parameters.items():
        choice = value.WhichOneof("parameter_choice")
        values[key] = None if choice is None else getattr(value, choice)
    return values


def decode_grpc_inputs(request: pb.ModelInferRequest,
                       shared_memory: SharedMemoryRegistry | None = None) -> dict[str, np.ndarray]:
    """A ModelInferRequest's tensors -> named arrays, each checked as the REST route checks its own: name, datatype,
    shape (rank and dimension limits before anything is sized from it), and a payload of exactly the shape's size.
    A tensor comes in a shared-memory region (its parameters name it), in `raw_input_contents` (one entry per input
    not in a region, in order: as `tritonclient.grpc` sends them) or in its typed `contents`."""
    if not request.inputs:
        raise ProtocolError("inference request needs at least one input")
    raw = list(request.raw_input_contents)
    sent = [tensor for tensor in request.inputs if REGION not in tensor.parameters]
    if raw and len(raw) != len(sent):
        raise ProtocolError(f"raw_input_contents has {len(raw)} entries for {len(sent)} inputs not in shared "
                            "memory: send one per such input, in order, or none")
    inputs: dict[str, np.ndarray] = {}
    for position, tensor in enumerate(request.inputs):
        if not tensor.name:
            raise ProtocolError(f"inputs[{position}] needs a name")
        what = f"input {shown(tensor.name)}"
        if tensor.name in inputs:
            raise ProtocolError(f"{what} is given twice")
        if tensor.datatype not in DATATYPES and tensor.datatype != "BYTES":
            raise ProtocolError(f"{what}: unknown datatype {shown(tensor.datatype)} (one of "
                                f"{', '.join([*DATATYPES, 'BYTES'])})")
        shape = _shape(list(tensor.shape), what)
        if REGION in tensor.parameters:
            if tensor.HasField("contents"):
                raise ProtocolError(f"{what} has its data both in a shared-memory region and in contents")
            inputs[tensor.name] = _from_shared_memory({}, parameter_values(tensor.parameters), shape,
                                                      tensor.datatype, what, shared_memory)
        elif raw:
            if tensor.HasField("contents"):
                raise ProtocolError(f"{what} has both contents and raw_input_contents")
            index = sent.index(tensor)
            inputs[tensor.name] = _from_binary(raw[index], shape, tensor.datatype, what,
                                               source=f"raw_input_contents[{index}]")
        else:
            inputs[tensor.name] = _from_contents(tensor, shape, what)
    return inputs


def _from_contents(tensor: pb.ModelInferRequest.InferInputTensor, shape: tuple[int, ...], what: str) -> np.ndarray:
    """A tensor's typed contents: only the field its datatype uses, holding exactly the shape's element count."""
    field = CONTENTS_FIELDS.get(tensor.datatype)
    if field is None:
        raise ProtocolError(f"{what}: {tensor.datatype} travels only in raw_input_contents (contents has no field "
                            "for it)")
    present = [f.name for f, _ in tensor.contents.ListFields()]
    if any(name != field for name in present):
        raise ProtocolError(f"{what}: {tensor.datatype} data goes in contents.{field}, got {', '.join(present)}")
    values = getattr(tensor.contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise ProtocolError(f"{what}: contents.{field} has {len(values)} elements, shape {list(shape)} needs {count}")
    if tensor.datatype == "BYTES":
        return _shaped(np.array(list(values), dtype=object), shape, what)
    try:
        # from a list: NumPy refuses a Python int out of the dtype's range, but wraps it from protobuf's container
        array = np.array(list(values), dtype=DATATYPES[tensor.datatype])
    except OverflowError as exc:
        raise ProtocolError(f"{what}: a value does not fit {tensor.datatype} ({exc})") from None
    return _shaped(array, shape, what)  # an empty tensor NumPy cannot describe is refused, not a crash


def requested_outputs(request: pb.ModelInferRequest) -> tuple[tuple[str, ...], dict[str, dict]]:
    """The outputs a request names (every output when it names none), each once; and, for those it places in a
    shared-memory region, their parameters."""
    names = [output.name for output in request.outputs]
    if len(set(names)) != len(names):
        raise ProtocolError(f"an output is requested twice: {[shown(n) for n in names]}")
    in_regions = {output.name: parameter_values(output.parameters) for output in request.outputs
                  if REGION in output.parameters}
    return tuple(names) or OUTPUTS, in_regions


def check_infer_request(request: pb.ModelInferRequest, model: ModelConfig, budget_bytes: int,
                        shared_memory: SharedMemoryRegistry | None = None
                        ) -> tuple[tuple[str, ...], dict[str, dict], InferCall]:
    """A ModelInferRequest for `model`, decoded and checked as the REST route checks its own: (the outputs it asks
    for, the parameters of those it places in shared memory, the call to run). Anything wrong raises
    `ProtocolError`."""
    wanted, in_regions = requested_outputs(request)
    for name, parameters in in_regions.items():
        if shared_memory is None:
            raise ProtocolError(f"output {shown(name)} names a shared-memory region, which this endpoint does not "
                                "write: ask for its bytes")
        shared_memory.check_output(parameters, f"output {shown(name)}")
    return wanted, in_regions, check_call(decode_grpc_inputs(request, shared_memory), wanted, model, budget_bytes)


def infer_response(name: str, version: str, request_id: str, outputs: list[tuple[str, np.ndarray]],
                   in_regions: dict[str, dict] | None = None) -> pb.ModelInferResponse:
    """Output arrays as Triton's gRPC server answers them: shapes and datatypes in `outputs`, little-endian bytes
    in `raw_output_contents` (what `tritonclient.grpc`'s `InferResult.as_numpy` reads). Outputs written to a
    shared-memory region (`in_regions`: name -> the parameters the answer gives them) come last and carry no bytes:
    the client reads `raw_output_contents` by position among the outputs."""
    in_regions = in_regions or {}
    response = pb.ModelInferResponse(model_name=name, model_version=version, id=request_id)
    for output_name, array in sorted(outputs, key=lambda output: output[0] in in_regions):
        tensor = response.outputs.add(name=output_name, datatype=datatype_of(array), shape=list(array.shape))
        if output_name in in_regions:
            for key, value in in_regions[output_name].items():
                setattr(tensor.parameters[key], "string_param" if isinstance(value, str) else "int64_param", value)
        else:
            response.raw_output_contents.append(
                np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes())
    return response


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService on one ingress replica: every RPC is the REST route's handler with the
    protobuf in place of JSON (`server` is the `serving.app.InferenceServer` that holds the models)."""

    def __init__(self, server):
        self.server = server

    async def _answer(self, method: str, name: str | None, context: grpc.aio.ServicerContext, handler):
        """Authorise, run `handler`, turn a `ProtocolError` into its gRPC status (any other failure into
        INTERNAL, costing one request), and count it in the ingress metrics as REST requests are."""
        started, code, reason = time.perf_counter(), 200, None
        try:
            if method not in OPEN_METHODS:
                metadata = dict(context.invocation_metadata() or ())
                self.server.check_api_key(metadata.get(AUTH_METADATA, ""))
            return await handler()
        except ProtocolError as exc:
            code, reason = exc.status, f"grpc_{grpc_status(exc).name.lower()}"
            status, message = grpc_status(exc), error_text(exc.message)
        except Exception as exc:  # a bug must cost one request, never the replica
            logger.exception("gRPC %s failed", method)
            code, reason = 500, "internal"
            status, message = grpc.StatusCode.INTERNAL, error_text(f"internal error: {type(exc).__name__}: {exc}")
        finally:
            label = name if name in self.server.default_versions else ("unknown" if name else None)
            self.server.metrics.record(label, f"grpc_{method}", code, (time.perf_counter() - started) * 1000.0,
                                       reason)
        await context.abort(status, message)

    async def ServerLive(self, request, context):
        return await self._answer("ServerLive", None, context, lambda: _value(pb.ServerLiveResponse(live=True)))

    async def ServerReady(self, request, context):
        async def ready():
            answers = [await self.server._ping(handle) for _, handle in self.server.models.values()]
            return pb.ServerReadyResponse(ready=all(answers))
        return await self._answer("ServerReady", None, context, ready)

    async def ModelReady(self, request, context):
        async def ready():
            _, handle = self.server._model(request.name, request.version or None)
            return pb.ModelReadyResponse(ready=await self.server._ping(handle))
        return await self._answer("ModelReady", request.name, context, ready)

    async def ServerMetadata(self, request, context):
        async def metadata():
            return pb.ServerMetadataResponse(**self.server.describe_server())
        return await self._answer("ServerMetadata", None, context, metadata)

    async def ModelMetadata(self, request, context):
        async def metadata():
            meta = await self.server.describe_model(request.name, request.version or None)
            return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                            inputs=_tensor_metadata(meta["inputs"]),
                                            outputs=_tensor_metadata(meta["outputs"]))
        return await self._answer("ModelMetadata", request.name, context, metadata)

    async def ModelInfer(self, request, context):
        async def infer():
            model, handle = self.server._model(request.model_name, request.model_version or None)
            wanted, in_regions, call = check_infer_request(request, model, self.server.config.request_budget_bytes,
                                                           self.server.shared_memory)
            input_regions = {t.name: parameter_values(t.parameters) for t in request.inputs if REGION in t.parameters}
            result = await self.server._call(model, handle, self.server.through_segments(call, input_regions,
                                                                                         in_regions))
            written = {out: self.server.shared_memory.answer_parameters(parameters, result[out], f"output {shown(out)}")
                       for out, parameters in in_regions.items()}
            return infer_response(request.model_name, model.version, request.id,
                                  [(out, result[out]) for out in wanted], written)
        return await self._answer("ModelInfer", request.model_name, context, infer)

    async def SystemSharedMemoryStatus(self, request, context):
        async def status():
            regions = self.server.shared_memory.status(request.name or None)
            return pb.SystemSharedMemoryStatusResponse(regions={
                region["name"]: pb.SystemSharedMemoryStatusResponse.RegionStatus(**region) for region in regions})
        return await self._answer("SystemSharedMemoryStatus", None, context, status)

    async def SystemSharedMemoryRegister(self, request, context):
        async def register():
            registration = {"key": request.key, "offset": request.offset, "byte_size": request.byte_size}
            await self.server.register_region(request.name, registration)
            return pb.SystemSharedMemoryRegisterResponse()
        return await self._answer("SystemSharedMemoryRegister", None, context, register)

    async def SystemSharedMemoryUnregister(self, request, context):
        async def unregister():
            self.server.shared_memory.unregister(request.name or None)
            return pb.SystemSharedMemoryUnregisterResponse()
        return await self._answer("SystemSharedMemoryUnregister", None, context, unregister)

    async def refuse_undecodable(self, method: str, request: Undecodable, context: grpc.aio.ServicerContext):
        return await self._answer(method, None, context, _refusal(
            f"the request is not a valid {request.message_type} message: {request.error}"))


async def _value(value):
    return value


def _refusal(message: str):
    async def refuse():
        raise ProtocolError(message)
    return refuse


def lenient_parser(message_type):
    """A deserializer that answers `Undecodable` for bytes that are not a `message_type`, rather than raising."""
    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return Undecodable(message_type.DESCRIPTOR.full_name, str(exc))
    return parse


def _checked(servicer: InferenceServicer, method: str):
    """`servicer`'s RPC `method`, refusing requests that did not decode."""
    async def behavior(request, context):
        if isinstance(request, Undecodable):
            return await servicer.refuse_undecodable(method, request, context)
        return await getattr(servicer, method)(request, context)
    return behavior


def add_servicer(servicer: InferenceServicer, grpc_server: grpc.aio.Server) -> None:
    """`SERVED_METHODS` on `grpc_server`, as the generated `add_GRPCInferenceServiceServicer_to_server` adds them,
    but with request bytes parsed where a malformed message can be answered (INVALID_ARGUMENT, not UNKNOWN)."""
    handlers = {method.name: grpc.unary_unary_rpc_method_handler(
                    _checked(servicer, method.name),
                    request_deserializer=lenient_parser(getattr(pb, method.input_type.name)),
                    response_serializer=getattr(pb, method.output_type.name).SerializeToString)
                for method in SERVICE.methods if method.name in SERVED_METHODS}
    grpc_server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    grpc_server.add_registered_method_handlers(SERVICE.full_name, handlers)


def _tensor_metadata(tensors: list[dict]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    return [pb.ModelMetadataResponse.TensorMetadata(name=t["name"], datatype=t["datatype"], shape=t["shape"])
            for t in tensors]


def start_grpc_server(server, host: str, port: int, max_message_bytes: int) -> grpc.aio.Server:
    """Bind `host:port` now (a port in use fails here, in the replica's constructor) and start serving on the
    running event loop. SO_REUSEPORT lets several ingress replicas, and a replacement started before the replica it
    replaces stops, share the port; requests larger than `max_message_bytes` get RESOURCE_EXHAUSTED from gRPC."""
    import asyncio

    grpc_server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_message_bytes),
                                           ("grpc.max_send_message_length", UNLIMITED),
                                           ("grpc.so_reuseport", 1)])
    add_servicer(InferenceServicer(server), grpc_server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    grpc_server.add_insecure_port(address)  # raises RuntimeError when it cannot bind
    asyncio.get_running_loop().create_task(grpc_server.start())
    return grpc_server
