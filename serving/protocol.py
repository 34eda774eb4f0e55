"""The Open Inference Protocol (KServe v2 / Triton REST) on the wire: inference requests and responses as JSON
tensors, and the binary tensor data extension (`Inference-Header-Content-Length`, `binary_data_size`,
`binary_data`, `binary_data_output`).

Pure functions on bytes and numpy arrays, shared by the server and the client, so both ends speak one codec.
Anything malformed raises `ProtocolError` with the HTTP status and a message naming what was wrong.
"""

from __future__ import annotations

import json
import math
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

#: dimensions a tensor may have: ours have 4 at most, NumPy stops at 64
MAX_RANK = 16
#: the largest one dimension may be (int32, as Triton's own dims)
MAX_DIMENSION = 2**31 - 1
#: characters of a client's string (a name, a datatype) repeated in an error message
ECHO_LIMIT = 64
#: the longest error message sent: a bound on what a client's values make it (gRPC carries it in metadata, which
#: clients cap at 8 KiB by default)
MAX_ERROR_CHARS = 1024


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
    #: its parameters, when they place it in a shared-memory region (`serving.shared_memory`)
    shared_memory: dict | None = None


@dataclass
class InferRequest:
    inputs: dict[str, np.ndarray]
    #: None: the client named no outputs, so all are returned
    outputs: list[RequestedOutput] | None
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    #: the request-level `binary_data_output` flag: the default for outputs not named
    binary_output: bool = False
    #: the parameters of the inputs read from a shared-memory region, by input name
    input_regions: dict[str, dict] = field(default_factory=dict)


def shown(value: Any) -> str:
    """A client's value as an error message repeats it: its repr, cut to `ECHO_LIMIT` characters."""
    text = repr(value)
    return text if len(text) <= ECHO_LIMIT else f"{text[:ECHO_LIMIT]}... ({len(text)} characters)"


def error_text(message: str) -> str:
    """An error message as sent: cut to `MAX_ERROR_CHARS`, saying so."""
    if len(message) <= MAX_ERROR_CHARS:
        return message
    return f"{message[:MAX_ERROR_CHARS]}... (cut from {len(message)} characters)"


def datatype_of(array: np.ndarray) -> str:
    if array.dtype == object or array.dtype.kind in "SU":
        return "BYTES"
    try:
        return _BY_DTYPE[array.dtype.newbyteorder("=")]
    except KeyError:
        raise ProtocolError(f"no OIP datatype for numpy dtype {array.dtype}", status=500) from None


# ---------------------------------------------------------------------------------------------- requests


def decode_infer_request(body: bytes, header_length: str | int | None = None, shared_memory=None) -> InferRequest:
    """An HTTP body (and its `Inference-Header-Content-Length` header, if any) -> named input arrays.
    `shared_memory`: the `serving.shared_memory.SharedMemoryRegistry` inputs placed in a region are read from."""
    json_part, binary = _split_body(body, header_length)
    header = _request_header(json_part, header_length)
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ProtocolError("inference request needs a non-empty 'inputs' list")
    inputs: dict[str, np.ndarray] = {}
    input_regions: dict[str, dict] = {}
    offset = 0
    for position, item in enumerate(raw_inputs):
        name, what, shape, datatype, parameters = _input_header(item, position, inputs)
        if "shared_memory_region" in parameters:
            inputs[name] = _from_shared_memory(item, parameters, shape, datatype, what, shared_memory)
            input_regions[name] = parameters
        elif "binary_data_size" in parameters:
            size = _binary_size(item, parameters, what, header_length, len(binary) - offset)
            inputs[name] = _from_binary(binary[offset:offset + size], shape, datatype, what)
            offset += size
        elif "data" in item:
            inputs[name] = _from_json(item["data"], shape, datatype, what)
        else:
            raise ProtocolError(f"{what} has neither 'data' nor parameters.binary_data_size")
    if offset != len(binary):
        raise ProtocolError(f"request body has {len(binary) - offset} binary bytes that no input's "
                            "binary_data_size accounts for")
    parameters, binary_output, request_id = _request_options(header)
    return InferRequest(inputs, _requested_outputs(header.get("outputs"), binary_output), request_id,
                        parameters, binary_output, input_regions)


def _request_header(json_part: bytes, header_length: str | int | None) -> dict:
    """The request's JSON object."""
    try:
        header = _parse_json(json_part, "inference request")
    except ProtocolError as exc:
        if header_length is None and "Extra data" in exc.message:
            raise ProtocolError(f"{exc.message}; a body of JSON then binary tensors needs the {HEADER_LENGTH} "
                                "header") from None
        raise
    if not isinstance(header, dict):
        raise ProtocolError("inference request must be a JSON object")
    return header


def _input_header(item: Any, position: int, seen: dict) -> tuple[str, str, tuple[int, ...], str, dict]:
    """One entry of 'inputs', checked: its name, how errors call it, shape, datatype and parameters."""
    if not isinstance(item, dict):
        raise ProtocolError(f"inputs[{position}] must be an object with name, shape, datatype and data")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise ProtocolError(f"inputs[{position}] needs a string 'name'")
    what = f"input {shown(name)}"
    if name in seen:
        raise ProtocolError(f"{what} is given twice")
    shape = _shape(item.get("shape"), what)
    datatype = item.get("datatype")
    if not isinstance(datatype, str) or (datatype not in DATATYPES and datatype != "BYTES"):
        raise ProtocolError(f"{what}: unknown datatype {shown(datatype)} (one of "
                            f"{', '.join([*DATATYPES, 'BYTES'])})")
    parameters = item.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError(f"{what}: 'parameters' must be an object")
    return name, what, shape, datatype, parameters


def _binary_size(item: dict, parameters: dict, what: str, header_length: str | int | None, bytes_left: int) -> int:
    """An input's binary_data_size, checked against the body's binary bytes not yet read."""
    size = parameters["binary_data_size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ProtocolError(f"{what}: binary_data_size must be a non-negative integer, got {shown(size)}")
    if header_length is None:
        raise ProtocolError(f"{what} has binary_data_size but the request has no {HEADER_LENGTH} header")
    if "data" in item:
        raise ProtocolError(f"{what} has both 'data' and binary_data_size")
    if size > bytes_left:
        raise ProtocolError(f"{what}: binary_data_size {size} runs past the end of the body "
                            f"({bytes_left} binary bytes left)")
    return size


def _request_options(header: dict) -> tuple[dict, bool, str | None]:
    """The request's parameters, whether it asks for binary outputs, and its id."""
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError("request 'parameters' must be an object")
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise ProtocolError(f"binary_data_output must be true or false, got {shown(binary_output)}")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError(f"request 'id' must be a string, got {shown(request_id)}")
    return parameters, binary_output, request_id


def _from_shared_memory(item: dict, parameters: dict, shape: tuple[int, ...], datatype: str, what: str,
                        shared_memory) -> np.ndarray:
    if shared_memory is None:
        raise ProtocolError(f"{what} names a shared-memory region, which this endpoint does not read: send its data")
    if "data" in item or "binary_data_size" in parameters:
        raise ProtocolError(f"{what} has its data both in a shared-memory region and in the request")
    expected = None if datatype == "BYTES" else math.prod(shape) * DATATYPES[datatype].itemsize
    return _from_binary(shared_memory.read_input(parameters, expected, what), shape, datatype, what)


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
        return json.loads(data, parse_constant=_not_json)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:  # the parser's own limit (~1000 levels): refused, never a crash
        raise ProtocolError(f"{what} is nested too deeply to be an inference request") from None


def _not_json(constant: str) -> None:
    """Python's parser takes NaN and Infinity; JSON has no such numbers."""
    raise ProtocolError(f"{constant} is not JSON: send finite numbers")


def _shape(value: Any, what: str) -> tuple[int, ...]:
    """A declared shape, checked before anything is sized from it: at most `MAX_RANK` dimensions, each a
    non-negative integer up to `MAX_DIMENSION` (element counts are then Python integers: nothing overflows)."""
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise ProtocolError(f"{what}: 'shape' must be a list of integers, got {shown(value)}")
    if len(value) > MAX_RANK:
        raise ProtocolError(f"{what}: shape has {len(value)} dimensions, more than the {MAX_RANK} allowed")
    if any(d < 0 for d in value):
        raise ProtocolError(f"{what}: shape {value} has a negative dimension")
    if any(d > MAX_DIMENSION for d in value):
        raise ProtocolError(f"{what}: shape {value} has a dimension over {MAX_DIMENSION}")
    return tuple(value)


def _shaped(array: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    """`array` (the right element count) in its declared shape; an empty tensor NumPy cannot describe is refused."""
    try:
        return array.reshape(shape)
    except ValueError as exc:
        raise ProtocolError(f"{what}: shape {list(shape)} cannot be held ({exc})") from None


def _from_binary(data: bytes, shape: tuple[int, ...], datatype: str, what: str,
                 source: str = "binary_data_size") -> np.ndarray:
    """`data` as a tensor of `shape` and `datatype`; `source`: where the bytes came from, as a message names it."""
    count = math.prod(shape)
    if datatype == "BYTES":
        items, offset = [], 0
        while offset < len(data):
            if offset + 4 > len(data):
                raise ProtocolError(f"{what}: BYTES element length prefix is cut off")
            length = int.from_bytes(data[offset:offset + 4], "little")
            items.append(data[offset + 4:offset + 4 + length])
            offset += 4 + length
            if len(items) > count:
                break
        if offset != len(data) or len(items) != count:
            raise ProtocolError(f"{what}: BYTES data holds {len(items)}{'+' if offset < len(data) else ''} "
                                f"elements, shape {list(shape)} needs {count}")
        return _shaped(np.array(items, dtype=object), shape, what)
    dtype = DATATYPES[datatype]
    if len(data) != count * dtype.itemsize:
        raise ProtocolError(f"{what}: {source} is {len(data)} bytes, but shape {list(shape)} of "
                            f"{datatype} needs {count * dtype.itemsize}")
    return _shaped(np.frombuffer(data, dtype=dtype), shape, what).astype(dtype.newbyteorder("="), copy=False)


def _from_json(data: Any, shape: tuple[int, ...], datatype: str, what: str) -> np.ndarray:
    """JSON `data`: a flat list of the shape's element count, or lists nested exactly as the shape, row-major."""
    count = math.prod(shape)
    if not isinstance(data, list):
        raise ProtocolError(f"{what}: 'data' must be a list, got {shown(data)}")
    if datatype == "BYTES":
        flat = _flat_strings(data, shape, what)
        array = np.array([x.encode() for x in flat], dtype=object)
    else:
        try:
            array = np.asarray(data, dtype=DATATYPES[datatype])
        except OverflowError as exc:
            raise ProtocolError(f"{what}: a value does not fit {datatype} ({exc})") from None
        except (TypeError, ValueError):
            raise ProtocolError(f"{what}: data is not a list of {datatype} numbers: it "
                                f"{_json_problem(data, shape)}") from None
        if array.dtype.kind == "f" and np.isnan(array).any():  # JSON null: NaN/Infinity are refused by the parser
            raise ProtocolError(f"{what}: data is not a list of {datatype} numbers: it holds null")
        if array.shape not in ((count,), shape) and array.size == count:
            raise ProtocolError(f"{what}: data is nested as {list(array.shape)}; send it flat or nested as the "
                                f"shape {list(shape)}")
    if array.size != count:
        raise ProtocolError(f"{what}: data has {array.size} elements, shape {list(shape)} needs {count}")
    return _shaped(array, shape, what)


def _json_problem(data: list, shape: tuple[int, ...]) -> str:
    """What is wrong with JSON tensor data NumPy could not read, found without recursion: a list nested deeper
    than the shape, a value that is not a number, or lists of unequal length."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, list):
            if depth > max(len(shape), 1):
                return f"is nested deeper than the shape's {len(shape)} dimensions"
            stack.extend((item, depth + 1) for item in value)
        elif isinstance(value, (dict, str)) or value is None:
            return f"holds {shown(value)}"
    return "is ragged: lists at one depth differ in length"


def _flat_strings(data: list, shape: tuple[int, ...], what: str) -> list[str]:
    """BYTES data in row-major order, nested no deeper than the shape (read without recursion)."""
    flat, stack = [], [(iter(data), 1)]
    while stack:
        items, depth = stack[-1]
        item = next(items, stack)
        if item is stack:
            stack.pop()
        elif isinstance(item, list):
            if depth >= max(len(shape), 1):
                raise ProtocolError(f"{what}: BYTES data is nested deeper than the shape's {len(shape)} dimensions")
            stack.append((iter(item), depth + 1))
        elif isinstance(item, str):
            flat.append(item)
        else:
            raise ProtocolError(f"{what}: BYTES data must be strings, got {shown(item)}")
    return flat


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
        in_region = parameters if isinstance(parameters, dict) and "shared_memory_region" in parameters else None
        outputs.append(RequestedOutput(item["name"], binary, in_region))
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
                          request_id: str | None = None, parameters: dict[str, Any] | None = None,
                          in_shared_memory: dict[str, dict] | None = None) -> tuple[bytes, dict[str, str]]:
    """(name, array, as_binary) outputs -> (body, headers): JSON alone, or JSON then binary blobs. Outputs named in
    `in_shared_memory` were written to a region: their entry carries its parameters and no data."""
    header: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        header["id"] = request_id
    if parameters:
        header["parameters"] = parameters
    header["outputs"] = []
    blobs = []
    for name, array, binary in outputs:
        if name in (in_shared_memory or {}):
            header["outputs"].append({"name": name, "datatype": datatype_of(array), "shape": list(array.shape),
                                      "parameters": in_shared_memory[name]})
            continue
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
    return json.dumps({"error": error_text(message)}).encode()
