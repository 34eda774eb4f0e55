"""The Open Inference Protocol (KServe v2 / Triton REST) on the wire: inference requests and responses as JSON
tensors, and the binary tensor data extension (`Inference-Header-Content-Length`, `binary_data_size`,
`binary_data`, `binary_data_output`).

Pure functions on bytes and numpy arrays, shared by the server and the client, so both ends speak one codec.
Anything malformed raises `ProtocolError` with the HTTP status and a message naming what was wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"

#: OIP datatype -> numpy dtype (little-endian, as the binary extension requires); BYTES handled apart
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
_BY_DTYPE = {dtype.newbyteorder("="): name for name, dtype in DATATYPES.items()}


class ProtocolError(Exception):
    """A request the protocol cannot accept: `status` is the HTTP status, `message` says why."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass
class RequestedOutput:
    name: str
    binary: bool


@dataclass
class InferRequest:
    inputs: dict[str, np.ndarray]
    #: None: the client named no outputs, so all are returned
    outputs: list[RequestedOutput] | None
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    #: the request-level `binary_data_output` flag: the default for outputs not named
    binary_output: bool = False


def datatype_of(array: np.ndarray) -> str:
    if array.dtype == object or array.dtype.kind in "SU":
        return "BYTES"
    try:
        return _BY_DTYPE[array.dtype.newbyteorder("=")]
    except KeyError:
        raise ProtocolError(f"no OIP datatype for numpy dtype {array.dtype}", status=500) from None


# ---------------------------------------------------------------------------------------------- requests


def decode_infer_request(body: bytes, header_length: str | int | None = None) -> InferRequest:
    """An HTTP body (and its `Inference-Header-Content-Length` header, if any) -> named input arrays."""
    json_part, binary = _split_body(body, header_length)
    try:
        header = _parse_json(json_part, "inference request")
    except ProtocolError as exc:
        if header_length is None and "Extra data" in exc.message:
            raise ProtocolError(f"{exc.message}; a body of JSON then binary tensors needs the {HEADER_LENGTH} "
                                "header") from None
        raise
    if not isinstance(header, dict):
        raise ProtocolError("inference request must be a JSON object")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ProtocolError("inference request needs a non-empty 'inputs' list")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for position, item in enumerate(raw_inputs):
        if not isinstance(item, dict):
            raise ProtocolError(f"inputs[{position}] must be an object with name, shape, datatype and data")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise ProtocolError(f"inputs[{position}] needs a string 'name'")
        if name in inputs:
            raise ProtocolError(f"input {name!r} is given twice")
        shape = _shape(item.get("shape"), f"input {name!r}")
        datatype = item.get("datatype")
        if datatype not in DATATYPES and datatype != "BYTES":
            raise ProtocolError(f"input {name!r}: unknown datatype {datatype!r} (one of "
                                f"{', '.join([*DATATYPES, 'BYTES'])})")
        parameters = item.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise ProtocolError(f"input {name!r}: 'parameters' must be an object")
        if "binary_data_size" in parameters:
            size = parameters["binary_data_size"]
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ProtocolError(f"input {name!r}: binary_data_size must be a non-negative integer, got {size!r}")
            if header_length is None:
                raise ProtocolError(f"input {name!r} has binary_data_size but the request has no "
                                    f"{HEADER_LENGTH} header")
            if "data" in item:
                raise ProtocolError(f"input {name!r} has both 'data' and binary_data_size")
            if offset + size > len(binary):
                raise ProtocolError(f"input {name!r}: binary_data_size {size} runs past the end of the body "
                                    f"({len(binary) - offset} binary bytes left)")
            inputs[name] = _from_binary(binary[offset:offset + size], shape, datatype, name)
            offset += size
        elif "data" in item:
            inputs[name] = _from_json(item["data"], shape, datatype, name)
        else:
            raise ProtocolError(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
    if offset != len(binary):
        raise ProtocolError(f"request body has {len(binary) - offset} binary bytes that no input's "
                            "binary_data_size accounts for")
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError("request 'parameters' must be an object")
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise ProtocolError(f"binary_data_output must be true or false, got {binary_output!r}")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError(f"request 'id' must be a string, got {request_id!r}")
    return InferRequest(inputs, _requested_outputs(header.get("outputs"), binary_output), request_id,
                        parameters, binary_output)


def _split_body(body: bytes, header_length: str | int | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    try:
        length = int(header_length)
    except (TypeError, ValueError):
        raise ProtocolError(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
    if not 0 < length <= len(body):
        raise ProtocolError(f"{HEADER_LENGTH} is {length} but the body has {len(body)} bytes")
    return body[:length], body[length:]


def _parse_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"{what} is not valid JSON: {exc}") from None


def _shape(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise ProtocolError(f"{what}: 'shape' must be a list of integers, got {value!r}")
    if any(d < 0 for d in value):
        raise ProtocolError(f"{what}: shape {value} has a negative dimension")
    return tuple(value)


def _from_binary(data: bytes, shape: tuple[int, ...], datatype: str, name: str) -> np.ndarray:
    count = int(np.prod(shape))
    if datatype == "BYTES":
        items, offset = [], 0
        while offset < len(data):
            if offset + 4 > len(data):
                raise ProtocolError(f"input {name!r}: BYTES element length prefix is cut off")
            length = int.from_bytes(data[offset:offset + 4], "little")
            items.append(data[offset + 4:offset + 4 + length])
            offset += 4 + length
        if offset != len(data) or len(items) != count:
            raise ProtocolError(f"input {name!r}: BYTES data holds {len(items)} elements, shape {list(shape)} "
                                f"needs {count}")
        return np.array(items, dtype=object).reshape(shape)
    dtype = DATATYPES[datatype]
    if len(data) != count * dtype.itemsize:
        raise ProtocolError(f"input {name!r}: binary_data_size is {len(data)} bytes, but shape {list(shape)} of "
                            f"{datatype} needs {count * dtype.itemsize}")
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def _from_json(data: Any, shape: tuple[int, ...], datatype: str, name: str) -> np.ndarray:
    count = int(np.prod(shape))
    if datatype == "BYTES":
        flat = list(_flatten(data))
        if not all(isinstance(x, str) for x in flat):
            raise ProtocolError(f"input {name!r}: BYTES data must be strings")
        array = np.array([x.encode() for x in flat], dtype=object)
    else:
        dtype = DATATYPES[datatype]
        try:
            array = np.asarray(data, dtype=dtype).reshape(-1)
        except (TypeError, ValueError):
            # nested lists of unequal length, strings, null, ...: numbers only, in row-major order
            try:
                array = np.asarray(list(_flatten(data)), dtype=dtype)
            except (TypeError, ValueError, OverflowError) as exc:
                raise ProtocolError(f"input {name!r}: data is not a list of {datatype} numbers ({exc})") from None
        except OverflowError as exc:
            raise ProtocolError(f"input {name!r}: a value does not fit {datatype} ({exc})") from None
    if array.size != count:
        raise ProtocolError(f"input {name!r}: data has {array.size} elements, shape {list(shape)} needs {count}")
    return array.reshape(shape)


def _flatten(value: Any):
    if isinstance(value, list):
        for item in value:
            yield from _flatten(item)
    else:
        yield value


def _requested_outputs(value: Any, binary_default: bool) -> list[RequestedOutput] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise ProtocolError("'outputs' must be a list of {name, parameters} objects")
    outputs, names = [], set()
    for position, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ProtocolError(f"outputs[{position}] needs a string 'name'")
        if item["name"] in names:
            raise ProtocolError(f"output {item['name']!r} is requested twice")
        names.add(item["name"])
        parameters = item.get("parameters") or {}
        binary = parameters.get("binary_data", binary_default) if isinstance(parameters, dict) else None
        if not isinstance(binary, bool):
            raise ProtocolError(f"output {item['name']!r}: binary_data must be true or false")
        outputs.append(RequestedOutput(item["name"], binary))
    return outputs


def encode_infer_request(inputs: dict[str, np.ndarray], outputs: dict[str, bool] | None = None,
                         binary_inputs: bool = True, request_id: str | None = None,
                         binary_output: bool = False) -> tuple[bytes, dict[str, str]]:
    """Named arrays -> (body, headers) of an inference request. `outputs` maps output names to "as binary"."""
    header: dict[str, Any] = {"inputs": []}
    if request_id is not None:
        header["id"] = request_id
    if binary_output:
        header["parameters"] = {"binary_data_output": True}
    blobs = []
    for name, array in inputs.items():
        entry, blob = _tensor_entry(name, np.asarray(array), binary_inputs)
        header["inputs"].append(entry)
        if blob is not None:
            blobs.append(blob)
    if outputs is not None:
        header["outputs"] = [{"name": n, "parameters": {"binary_data": b}} for n, b in outputs.items()]
    return _assemble(header, blobs)


# --------------------------------------------------------------------------------------------- responses


def encode_infer_response(model_name: str, model_version: str, outputs: list[tuple[str, np.ndarray, bool]],
                          request_id: str | None = None,
                          parameters: dict[str, Any] | None = None) -> tuple[bytes, dict[str, str]]:
    """(name, array, as_binary) outputs -> (body, headers): JSON alone, or JSON then binary blobs."""
    header: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        header["id"] = request_id
    if parameters:
        header["parameters"] = parameters
    header["outputs"] = []
    blobs = []
    for name, array, binary in outputs:
        entry, blob = _tensor_entry(name, array, binary)
        header["outputs"].append(entry)
        if blob is not None:
            blobs.append(blob)
    return _assemble(header, blobs)


def decode_infer_response(body: bytes, header_length: str | int | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """A response body -> (JSON header, named output arrays)."""
    json_part, binary = _split_body(body, header_length)
    header = _parse_json(json_part, "inference response")
    if "error" in header:
        raise ProtocolError(header["error"])
    arrays, offset = {}, 0
    for item in header.get("outputs", []):
        shape = _shape(item["shape"], f"output {item['name']!r}")
        size = (item.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            arrays[item["name"]] = _from_binary(binary[offset:offset + size], shape, item["datatype"], item["name"])
            offset += size
        else:
            arrays[item["name"]] = _from_json(item["data"], shape, item["datatype"], item["name"])
    return header, arrays


def _tensor_entry(name: str, array: np.ndarray, binary: bool) -> tuple[dict, bytes | None]:
    datatype = datatype_of(array)
    entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
    if binary:
        blob = _to_binary(array, datatype)
        entry["parameters"] = {"binary_data_size": len(blob)}
        return entry, blob
    if datatype == "BYTES":
        entry["data"] = [x.decode() if isinstance(x, bytes) else str(x) for x in array.reshape(-1)]
    else:
        entry["data"] = array.reshape(-1).tolist()
    return entry, None


def _to_binary(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        parts = []
        for item in array.reshape(-1):
            data = item if isinstance(item, bytes) else str(item).encode()
            parts += [len(data).to_bytes(4, "little"), data]
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=DATATYPES[datatype]).tobytes()


def _assemble(header: dict, blobs: list[bytes]) -> tuple[bytes, dict[str, str]]:
    text = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    if not blobs:
        return text, {"Content-Type": "application/json"}
    return b"".join([text, *blobs]), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(text))}


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()
