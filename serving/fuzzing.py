"""Malformed inference requests for the decoder's tests and the service's fuzz run (`bench/serve_fuzz.py`).

REST, drawn at random: a valid request with 1-3 of its fields replaced by garbage, and whole bodies that are
wrong at the byte level (cut-off binary parts, headers that lie about lengths, compressed garbage, wrong content
types). Each form once answered 500 or held memory somewhere; none may now.

gRPC and system shared memory, as named, distinct, seeded cases that each say what their answer must name:
ModelInferRequests (`malformed_grpc_requests`: shapes that overflow or no image has, unknown datatypes, raw or
typed contents of the wrong size, count or field, bad names, models, outputs and parameters, bytes that are no
message) and shared-memory registrations and inferences (`malformed_shm_requests`). A gRPC form that answered
INTERNAL or UNKNOWN: typed contents of a shape too big for NumPy to describe, bytes that are no message, an
output asked for in shared memory (answered OK, its bytes not where the client asked; now written there, or
refused before the engine runs when its region cannot take it)."""

from __future__ import annotations

import copy
import gzip
import itertools
import json
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import quote

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from serving.protocol import HEADER_LENGTH, shown


def deep(depth: int) -> str:
    """JSON nested `depth` lists deep (as text: the parser, not Python, must meet the depth)."""
    return "[" * depth + "1" + "]" * depth


GARBAGE = [None, True, -1, 0, 2**31, 2**63, 2**64 + 1, 1.5, "", "FP32", "x" * 300, [], [None], [[1, 2], [3]], {},
           {"a": 1}, [2**62, 4], [1] * 70, ["FP32"], [-1, 3], deep(50)]
FIELDS = [("inputs",), ("inputs", 0), ("inputs", 0, "name"), ("inputs", 0, "shape"), ("inputs", 0, "shape", 0),
          ("inputs", 0, "datatype"), ("inputs", 0, "data"), ("inputs", 0, "data", 0), ("inputs", 0, "parameters"),
          ("inputs", 0, "parameters", "binary_data_size"), ("inputs", 0, "parameters", "shared_memory_region"),
          ("inputs", 0, "parameters", "shared_memory_byte_size"), ("outputs",), ("outputs", 0),
          ("outputs", 0, "name"), ("outputs", 0, "parameters"), ("outputs", 0, "parameters", "binary_data"),
          ("outputs", 0, "parameters", "shared_memory_region"), ("parameters",),
          ("parameters", "binary_data_output"), ("id",)]


def valid_request(side: int = 32) -> dict:
    """A good JSON request for one `side` x `side` frame's labels."""
    return {"id": "r", "parameters": {"binary_data_output": False},
            "inputs": [{"name": "frames", "shape": [1, side, side, 3], "datatype": "UINT8",
                        "data": [0] * (side * side * 3), "parameters": {}}],
            "outputs": [{"name": "labels", "parameters": {"binary_data": False}}]}


def mutated_request(rng: np.random.Generator, side: int = 32) -> dict:
    """A valid request with 1-3 fields (anywhere in it) replaced by garbage."""
    request = valid_request(side)
    for _ in range(int(rng.integers(1, 4))):
        path = FIELDS[int(rng.integers(len(FIELDS)))]
        target = request
        try:
            for key in path[:-1]:
                target = target[key]
            value = copy.deepcopy(GARBAGE[int(rng.integers(len(GARBAGE)))])
            target[path[-1]] = json.loads(value) if isinstance(value, str) and value.startswith("[[[") else value
        except (KeyError, IndexError, TypeError):
            pass  # the path was already mutated away
    return request


def malformed_body(rng: np.random.Generator, side: int = 32) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of a request that is wrong somewhere: its JSON fields (most draws) or its bytes."""
    form = int(rng.integers(8))
    if form < 4:
        return json.dumps(mutated_request(rng, side)).encode(), {"Content-Type": "application/json"}
    header = valid_request(side)
    del header["inputs"][0]["data"]
    size = side * side * 3
    header["inputs"][0]["parameters"] = {"binary_data_size": size}
    text = json.dumps(header).encode()
    blob = bytes(size)
    binary = {"Content-Type": "application/octet-stream"}
    if form == 4:  # the binary part cut short
        return text + blob[:int(rng.integers(size))], binary | {HEADER_LENGTH: str(len(text))}
    if form == 5:  # a header length that lies
        lie = int(rng.choice([0, -1, len(text) - 1, len(text) + 7, 2**40]))
        return text + blob, binary | {HEADER_LENGTH: str(lie)}
    if form == 6:  # compressed garbage, or a compressed body cut short
        packed = gzip.compress(text + blob)
        return packed[:int(rng.integers(1, len(packed)))], binary | {HEADER_LENGTH: str(len(text)),
                                                                    "Content-Encoding": "gzip"}
    return bytes(rng.integers(0, 256, int(rng.integers(1, 512)), dtype=np.uint8)), {
        "Content-Type": str(rng.choice(["application/json", "text/plain", "application/octet-stream"]))}


# ------------------------------------------------------------------------------------- named malformed cases
# The gRPC and shared-memory fuzz: a catalog of named ways to break a good request, by kind of problem, each once,
# then seeded combinations of 2-3 of them of different kinds, until `count` distinct requests. Each case carries
# what its answer must say.

#: how many catalog mutations a combined case applies, at least and at most
COMBINED = (2, 3)
#: draws after which a generator gives up finding another distinct combination
MAX_DRAWS = 100_000


@dataclass(frozen=True)
class Mutation:
    """One way to break a good request: `apply` edits it in place; `says` (a regex) names the problem in the
    answer's message; `statuses`: the statuses that answer may have (gRPC status names, or HTTP codes)."""

    name: str
    apply: Callable[[Any], None]
    says: str
    statuses: tuple = ()


@dataclass(frozen=True)
class Case:
    """A malformed request ready to send (`request`: serialized gRPC bytes, or an `HttpRequest`), named, with
    the regex its answer's message must match and the statuses it may get."""

    name: str
    request: Any
    says: str
    statuses: frozenset


def _cases(catalog: dict[str, list[Mutation]], build: Callable[[], Any], finish: Callable[[Any], Any], count: int,
           seed: int, key: Callable[[Any], Any], alone: tuple[str, ...] = ()) -> list[Case]:
    """Each mutation of `catalog` (kind -> mutations) once on a fresh `build()`, then seeded combinations of
    mutations of different kinds, to `count` distinct requests (by `key` of the finished request); `finish` turns
    an edited request into what is sent. Kinds in `alone` are not combined (their answer would hide the rest)."""
    rng = np.random.default_rng(seed)
    cases, seen = [], set()

    def add(parts: list[Mutation]) -> None:
        request = build()
        for part in parts:
            part.apply(request)
        finished = finish(request)
        if key(finished) not in seen:
            seen.add(key(finished))
            cases.append(Case(" + ".join(p.name for p in parts), finished, "|".join(f"(?:{p.says})" for p in parts),
                              frozenset().union(*(p.statuses for p in parts))))

    # one of each kind in turn, so that fewer cases than the catalog holds still cover every kind
    singles = [m for turn in itertools.zip_longest(*catalog.values()) for m in turn if m is not None]
    for mutation in singles[:count]:
        add([mutation])
    kinds = [kind for kind in catalog if kind not in alone]
    for _ in range(MAX_DRAWS):
        if len(cases) >= count:
            break
        chosen = rng.choice(len(kinds), int(rng.integers(COMBINED[0], COMBINED[1] + 1)), replace=False)
        add([catalog[kinds[k]][int(rng.integers(len(catalog[kinds[k]])))] for k in sorted(chosen)])
    return cases


# ---------------------------------------------------------------------------------------------------- gRPC

#: the method a gRPC case is sent to (its bytes go unparsed: some are not a message at all)
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
INVALID, NOT_FOUND = ("INVALID_ARGUMENT",), ("NOT_FOUND",)
#: the regexes by which an answer names each kind of problem
SHAPE_PROBLEM = r"shape|dimension|elements|needs \d+|4-D|channels|holds (no|\d+) images|smaller than"
DATATYPE_PROBLEM = r"datatype|must be (UINT8|FP32)|needs \d+|elements|contents|BYTES"
RAW_PROBLEM = r"raw_input_contents"
TYPED_PROBLEM = r"contents|elements|does not fit"
NAME_PROBLEM = r"name|unknown input|given twice|exactly one input|must be FP32"
MODEL_PROBLEM = r"unknown model|no version"
OUTPUT_PROBLEM = r"output"
SHARED_MEMORY_PROBLEM = r"shared_memory_\w+ must|shared-memory region|raw_input_contents has \d+ entries"
VALUE_PROBLEM = r"NaN or infinite"
MESSAGE_PROBLEM = r"not a valid inference\.ModelInferRequest"
#: shapes no request may declare: a dimension or element count out of range, a rank the model or NumPy cannot
#: take, or a shape no image has
BAD_SHAPES = {"[2^32, 2^32] (count overflows int64)": [2**32, 2**32], "[2^62, 4] (count overflows int64)": [2**62, 4],
              "of 65 dimensions": [1] * 65, "of 17 dimensions": [1] * 17, "with a negative side": [1, -32, 32, 3],
              "with a -1 wildcard": [-1, 32, 32, 3], "[int64 min]": [-2**63], "[int64 max]": [2**63 - 1],
              "with a side of 2^31": [1, 2**31, 32, 3], "[]": [], "of batch 0": [0, 32, 32, 3],
              "of side 0": [1, 0, 32, 3], "[0, 2^31-1 x 3] (too big to hold)": [0] + [2**31 - 1] * 3,
              "3-D": [32, 32, 3], "5-D": [1, 1, 32, 32, 3], "of 2 channels": [1, 32, 48, 2],
              "NCHW for NHWC frames": [1, 3, 32, 32], "of 8x8 frames": [1, 8, 8, 3], "of batch 64": [64, 32, 32, 3]}
BAD_DATATYPES = ["FP33", "", "uint8", "TYPE_UINT8", "BYTES", "FP16", "INT64", "BOOL", "FP32", "UINT8 ", "ÜINT8",
                 "X" * 300]
#: a name longer than a status's message may be (gRPC clients drop a status whose metadata passes ~8 KiB)
LONG_NAME = 20_000
#: names an input must not have: none, unknown, of a different case, holding NUL, the other input's, very long
BAD_INPUT_NAMES = ["", "pixels", "FRAMES", "frames\0", "images", "f" * LONG_NAME]
#: typed contents fields with one value that fits each
CONTENTS_VALUES = {"fp32_contents": 0.0, "int_contents": 0, "int64_contents": 0, "uint64_contents": 0,
                   "bool_contents": False, "bytes_contents": b"\0"}
#: the forms an `InferParameter` value takes
PARAMETER_VALUES = {"string": ("string_param", "frames0"), "empty string": ("string_param", ""),
                    "int64": ("int64_param", 7), "bool": ("bool_param", True), "double": ("double_param", 1.5),
                    "uint64": ("uint64_param", 2**64 - 1)}
#: how many random-byte bodies the catalog holds, and their longest
RANDOM_BODIES, RANDOM_BODY_BYTES = 4, 512
#: the side of the frames in the gRPC and shared-memory cases' good requests (the models' smallest)
SIDE = 32
FRAME_BYTES = SIDE * SIDE * 3
#: the most typed values a case puts in a tensor's contents (a shape's element count may be astronomic)
MAX_TYPED_VALUES = 1 << 16


def good_grpc_request(model: str):
    """A good ModelInferRequest: one black `SIDE` x `SIDE` frame in raw_input_contents, asking for its labels."""
    request = pb.ModelInferRequest(model_name=model, id="fuzz")
    request.inputs.add(name="frames", datatype="UINT8", shape=[1, SIDE, SIDE, 3])
    request.raw_input_contents.append(bytes(FRAME_BYTES))
    request.outputs.add(name="labels")
    return request


def malformed_grpc_requests(model: str, count: int, seed: int = 0) -> list[Case]:
    """`count` distinct malformed ModelInferRequests (serialized) for `model`: the catalog's mutations once each,
    bytes that are no such message, then seeded combinations of 2-3 mutations."""
    catalog = grpc_mutations(model)
    byte_cases = _undecodable(good_grpc_request(model), seed)
    cases = _cases(catalog, lambda: good_grpc_request(model), lambda r: r.SerializeToString(deterministic=True),
                   max(count - len(byte_cases), 0), seed, lambda data: data, alone=("model",))
    return (byte_cases + cases)[:count]


def grpc_mutations(model: str) -> dict[str, list[Mutation]]:
    """The ways to break a good ModelInferRequest, by kind."""
    return {"shape": _shape_mutations(), "datatype": _datatype_mutations(), "raw": _raw_mutations(),
            "typed": _typed_mutations(), "name": _name_mutations(), "model": _model_mutations(model),
            "output": _output_mutations(), "parameter": _parameter_mutations(), "value": _value_mutations()}


def _first_input(edit: Callable) -> Callable:
    """`edit(tensor, request)` on the first input, if a mutation before it left one."""
    def apply(request) -> None:
        if request.inputs:
            edit(request.inputs[0], request)
    return apply


def _reshape(dims: list[int]) -> Callable:
    def edit(tensor, request) -> None:
        del tensor.shape[:]
        tensor.shape.extend(dims)
    return _first_input(edit)


def _drop_raw(request) -> None:
    del request.raw_input_contents[:]


def _empty_contents(request) -> None:
    _drop_raw(request)
    _first_input(lambda tensor, _: tensor.contents.SetInParent())(request)


def _shape_mutations() -> list[Mutation]:
    payloads = {"the frame's raw bytes": lambda request: None, "no data": _drop_raw,
                "empty typed contents": _empty_contents}
    return [Mutation(f"shape {shape}, {payload}", _chain(_reshape(dims), clear), SHAPE_PROBLEM, INVALID)
            for shape, dims in BAD_SHAPES.items() for payload, clear in payloads.items()]


def _chain(*edits: Callable) -> Callable:
    def apply(request) -> None:
        for edit in edits:
            edit(request)
    return apply


def _datatype_mutations() -> list[Mutation]:
    return [Mutation(f"datatype {shown(datatype)}", _first_input(lambda t, _, d=datatype: setattr(t, "datatype", d)),
                     DATATYPE_PROBLEM, INVALID) for datatype in BAD_DATATYPES]


def _raw_size(request) -> int:
    return len(request.raw_input_contents[0]) if request.raw_input_contents else 0


def _raw_mutations() -> list[Mutation]:
    def resize(change: Callable[[int], int]) -> Callable:
        def apply(request) -> None:
            if request.raw_input_contents:
                request.raw_input_contents[0] = bytes(max(change(_raw_size(request)), 0))
        return apply

    sizes = {"empty": lambda n: 0, "of one byte": lambda n: 1, "a byte short": lambda n: n - 1,
             "a byte over": lambda n: n + 1, "twice the size": lambda n: 2 * n}
    counts = {"two raw entries for one input": 1, "three raw entries for one input": 2}
    return ([Mutation(f"raw contents {name}", resize(change), RAW_PROBLEM, INVALID) for name, change in sizes.items()]
            + [Mutation(name, lambda r, n=extra: r.raw_input_contents.extend([b"\0"] * n), RAW_PROBLEM, INVALID)
               for name, extra in counts.items()]
            + [Mutation(f"both raw contents and contents.{field}",
                        _first_input(lambda t, _, f=field, v=value: getattr(t.contents, f).append(v)),
                        r"both contents and raw_input_contents|contents", INVALID)
               for field, value in [("uint_contents", 0), *CONTENTS_VALUES.items()]])


def _typed(field: str, values: Callable[[int], list]) -> Callable:
    """The first input's data moved to typed contents: `values(count)` in `field`, count the shape's elements."""
    def edit(tensor, request) -> None:
        _drop_raw(request)
        count = int(np.prod(tensor.shape, dtype=object))
        getattr(tensor.contents, field).extend(values(min(max(count, 0), MAX_TYPED_VALUES)))
    return _first_input(edit)


def _typed_mutations() -> list[Mutation]:
    counts = {"short": lambda n: [0] * 10, "one over": lambda n: [0] * (n + 1), "empty": lambda n: []}
    return ([Mutation(f"uint_contents {name}", _typed("uint_contents", values), TYPED_PROBLEM, INVALID)
             for name, values in counts.items()]
            + [Mutation(f"frames in contents.{field}", _typed(field, lambda n, v=value: [v] * n), TYPED_PROBLEM,
                        INVALID) for field, value in CONTENTS_VALUES.items()]
            + [Mutation(f"uint_contents holding {value}", _typed("uint_contents", lambda n, v=value: [v] * n),
                        TYPED_PROBLEM, INVALID) for value in (256, 2**32 - 1)]
            + [Mutation("uint_contents and int_contents both", _chain(
                _typed("uint_contents", lambda n: [0] * n), _typed("int_contents", lambda n: [0])), TYPED_PROBLEM,
                INVALID)])


def _add_input(name: str, datatype: str, dims: list[int], size: int) -> Callable:
    def apply(request) -> None:
        request.inputs.add(name=name, datatype=datatype, shape=dims)
        if request.raw_input_contents:
            request.raw_input_contents.append(bytes(size))
    return apply


def _name_mutations() -> list[Mutation]:
    renamed = [Mutation(f"input named {shown(name)}", _first_input(lambda t, _, n=name: setattr(t, "name", n)),
                        NAME_PROBLEM, INVALID) for name in BAD_INPUT_NAMES]
    extra = {"frames given twice": ("frames", "UINT8", [1, SIDE, SIDE, 3], FRAME_BYTES),
             "frames and images": ("images", "FP32", [1, 3, SIDE, SIDE], 4 * FRAME_BYTES),
             "frames and an unknown input": ("pixels", "UINT8", [1, SIDE, SIDE, 3], FRAME_BYTES)}
    none = Mutation("no inputs", lambda r: (r.ClearField("inputs"), _drop_raw(r)), r"at least one input", INVALID)
    return [*renamed, none, *(Mutation(name, _add_input(*spec), NAME_PROBLEM, INVALID) for name, spec in extra.items())]


def _model_mutations(model: str) -> list[Mutation]:
    names = [f"{model}-unknown", "", f"{model}/../{model}", model.upper() + "É", "m" * LONG_NAME]
    versions = ["7", "-1", " 1", "v" * LONG_NAME]
    return ([Mutation(f"model {shown(name)}", lambda r, n=name: setattr(r, "model_name", n), MODEL_PROBLEM, NOT_FOUND)
             for name in names]
            + [Mutation(f"version {shown(version)}", lambda r, v=version: setattr(r, "model_version", v),
                        MODEL_PROBLEM, NOT_FOUND) for version in versions])


def _output_mutations() -> list[Mutation]:
    named = [Mutation(f"output {shown(name)}", lambda r, n=name: r.outputs.add(name=n), OUTPUT_PROBLEM, INVALID)
             for name in ("edges", "labels", "", "o" * LONG_NAME)]
    return named + [Mutation(f"output in shared memory ({kind} region)", _output_parameter(field, value),
                             SHARED_MEMORY_PROBLEM, INVALID + NOT_FOUND)
                    for kind, (field, value) in PARAMETER_VALUES.items()]


def _output_parameter(field: str, value: Any) -> Callable:
    def apply(request) -> None:
        output = request.outputs[0] if request.outputs else request.outputs.add(name="labels")
        setattr(output.parameters["shared_memory_region"], field, value)
    return apply


def _parameter_mutations() -> list[Mutation]:
    def parameter(key: str, field: str, value: Any) -> Callable:
        return _first_input(lambda t, _: setattr(t.parameters[key], field, value))

    regions = [Mutation(f"input in shared memory ({kind} region)", parameter("shared_memory_region", field, value),
                        SHARED_MEMORY_PROBLEM, INVALID + NOT_FOUND)
               for kind, (field, value) in PARAMETER_VALUES.items()]
    sized = Mutation("input in shared memory with a negative offset", _chain(
        parameter("shared_memory_region", "string_param", "frames0"),
        parameter("shared_memory_offset", "int64_param", -1)), SHARED_MEMORY_PROBLEM, INVALID)
    return [*regions, sized]


def _images(fill: float) -> Callable:
    """The frame replaced by FP32 images of `fill` (in raw contents, or typed where the data went there)."""
    def edit(tensor, request) -> None:
        tensor.name, tensor.datatype = "images", "FP32"
        del tensor.shape[:]
        tensor.shape.extend([1, 3, SIDE, SIDE])
        tensor.ClearField("contents")
        if request.raw_input_contents:
            request.raw_input_contents[0] = np.full((1, 3, SIDE, SIDE), fill, np.float32).tobytes()
        else:
            tensor.contents.fp32_contents.extend([fill] * FRAME_BYTES)
    return _first_input(edit)


def _value_mutations() -> list[Mutation]:
    return [Mutation(f"images of {fill}", _images(fill), VALUE_PROBLEM, INVALID)
            for fill in (float("nan"), float("inf"), float("-inf"))]


def _undecodable(good, seed: int) -> list[Case]:
    """Bodies that are not a ModelInferRequest: cut short, lengths that run past the end, invalid UTF-8 in its
    strings; and random bytes (which may parse as an empty message: then the model '' is not found)."""
    data = good.SerializeToString(deterministic=True)
    forms = {"message cut short": data[:-7], "a length past the end": b"\x0a\x64ab",
             "invalid UTF-8 in the model name": b"\x0a\x02\xff\xfe" + data,
             "invalid UTF-8 in the input name": data.replace(b"frames", b"fr\xffmes", 1),
             "invalid UTF-8 in the datatype": data.replace(b"UINT8", b"UINT\xc3", 1),
             "a field number of 0": b"\x02\x00" + data}
    cases = [Case(name, body, MESSAGE_PROBLEM, frozenset(INVALID)) for name, body in forms.items()]
    rng = np.random.default_rng(seed)
    for number in range(RANDOM_BODIES):
        body = rng.integers(0, 256, int(rng.integers(1, RANDOM_BODY_BYTES)), dtype=np.uint8).tobytes()
        cases.append(Case(f"random bytes #{number}", body, f"{MESSAGE_PROBLEM}|{MODEL_PROBLEM}|input",
                          frozenset(INVALID + NOT_FOUND)))
    return cases


# ------------------------------------------------------------------------------------------- shared memory

class _Missing:
    """What a mutation sets a parameter to when it removes it."""

    def __repr__(self) -> str:
        return "missing"


MISSING = _Missing()
#: the share of shared-memory cases that are registrations (the rest are inferences)
REGISTRATION_SHARE = 0.3
#: where a registration's region goes, unless a case names another
NEW_REGION = "fuzz-new"
#: a region nothing registers
NOWHERE = "fuzz-nowhere"
SHM_REGION, SHM_BYTE_SIZE, SHM_OFFSET = "shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"
#: values no region parameter may take (the name of a region that is not registered among them)
REGION_GARBAGE = [None, True, -1, 2**31, 1.5, "", [], {}, NOWHERE, "x" * 300, "0"]
#: values no size or offset may take, whatever the region
NUMBER_GARBAGE = [None, True, False, -1, 2**64 + 1, 1.5, "0", "", [], {}]
#: region names a registration must not use: not letters, digits, '_', '.', '-' after a letter or digit, or long
BAD_REGION_NAMES = ["-dash-first", "a b", "ü", "r" * 300]
#: bodies that are no registration
BAD_REGISTRATION_BODIES = {"not JSON": b"{", "a JSON list": b"[]", "JSON null": b"null", "a JSON string": b'"key"',
                           "empty": b"", "invalid UTF-8": b"\xff\xfe", "nested 5000 deep": deep(5000).encode(),
                           "blank": b"   "}
#: how an answer names a bad registration body (a blank one is an empty object: its key is missing)
REGISTRATION_PROBLEM = r"registration|JSON|body is empty|nested too deeply|key"


@dataclass(frozen=True)
class HttpRequest:
    """An HTTP request to send, its `path` from the service's root."""

    method: str
    path: str
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)


@dataclass(frozen=True)
class ShmSetup:
    """The regions a shared-memory fuzz registers before it starts: `frames_region`, all of segment `frames_key`,
    exactly one SIDE x SIDE UINT8 frame; `labels_region`, all of `labels_key`, exactly that frame's label map
    (`label_bytes`: UINT8 labels, a model of at most 256 classes); `model`: the model the cases call."""

    model: str
    frames_key: str
    labels_key: str
    frames_region: str = "fuzz-frames"
    labels_region: str = "fuzz-labels"
    label_bytes: int = SIDE * SIDE

    def registrations(self) -> list[tuple[str, str, int]]:
        """(region, key, byte_size) of each region to register first."""
        return [(self.frames_region, self.frames_key, FRAME_BYTES), (self.labels_region, self.labels_key,
                                                                     self.label_bytes)]


def good_shm_infer(setup: ShmSetup) -> dict:
    """A good JSON inference request: the frame read from `frames_region`, its labels written to `labels_region`."""
    return {"inputs": [{"name": "frames", "shape": [1, SIDE, SIDE, 3], "datatype": "UINT8",
                        "parameters": {SHM_REGION: setup.frames_region, SHM_BYTE_SIZE: FRAME_BYTES}}],
            "outputs": [{"name": "labels", "parameters": {SHM_REGION: setup.labels_region,
                                                          SHM_BYTE_SIZE: setup.label_bytes}}]}


def infer_http(model: str, request: dict) -> HttpRequest:
    return HttpRequest("POST", f"/v2/models/{quote(model, safe='')}/infer", json.dumps(request).encode())


def malformed_shm_requests(setup: ShmSetup, count: int, seed: int = 0) -> list[Case]:
    """`count` distinct malformed shared-memory requests (HTTP): registrations (a missing, unknown or bad key;
    offsets and sizes of the wrong type, negative, overflowing or past the segment; bad region names and bodies)
    and inferences whose regions, sizes and offsets are wrong (unregistered, past the region, not the tensor's
    size, of the wrong type), each kind once, then seeded combinations."""
    registrations = max(int(count * REGISTRATION_SHARE), 1)
    status = Case("status of an unregistered region", HttpRequest("GET", f"/v2/systemsharedmemory/region/{NOWHERE}"
                  "/status", headers=()), "no shared-memory region", frozenset({404}))
    cases = [status] + _cases(registration_mutations(setup), lambda: _registration(setup), _registration_http,
                              registrations - 1, seed, _http_key)
    return cases + _cases(shm_infer_mutations(setup), lambda: good_shm_infer(setup),
                          lambda request: infer_http(setup.model, request), count - len(cases), seed, _http_key)


def _http_key(request: HttpRequest) -> tuple:
    return request.method, request.path, request.body


def _registration(setup: ShmSetup) -> dict:
    """A good registration of all of the frames segment, as the edits see it: region name, JSON object, and the
    body bytes when a mutation replaces the JSON."""
    return {"region": NEW_REGION, "json": {"key": setup.frames_key, "offset": 0, "byte_size": FRAME_BYTES},
            "body": None}


def _registration_json(registration: dict) -> dict:
    return registration["json"]


def _registration_http(registration: dict) -> HttpRequest:
    body = registration["body"] if registration["body"] is not None else json.dumps(registration["json"]).encode()
    return HttpRequest("POST", f"/v2/systemsharedmemory/region/{quote(registration['region'], safe='')}/register",
                       body)


def _set(container: Callable[[Any], dict], key: str, value: Any) -> Callable:
    """An edit that sets `key` of `container(request)` to `value` (removes it for `MISSING`)."""
    def apply(request) -> None:
        target = container(request)
        if value is MISSING:
            target.pop(key, None)
        else:
            target[key] = copy.deepcopy(value)
    return apply


def _field_mutations(label: str, container: Callable, key: str, values: list, says: str,
                     statuses: tuple) -> list[Mutation]:
    return [Mutation(f"{label} {shown(value)}", _set(container, key, value), says, statuses) for value in values]


def registration_mutations(setup: ShmSetup) -> dict[str, list[Mutation]]:
    """The ways to break a good registration, by field."""
    keys = [MISSING, None, 7, True, [], {}, "", "a/b", "../etc/passwd", "k" * 300, "/", "has space",
            "-dash-first", f"{setup.frames_key}-missing"]
    offsets = [*NUMBER_GARBAGE, 2**64, 1, FRAME_BYTES + 1]
    sizes = [MISSING] + NUMBER_GARBAGE + [2**63, FRAME_BYTES + 1]
    replaced = [Mutation(f"registration body {name}", _set(lambda r: r, "body", data), REGISTRATION_PROBLEM, (400,))
                for name, data in BAD_REGISTRATION_BODIES.items()]
    names = [Mutation(f"region name {shown(name)}", _set(lambda r: r, "region", name), r"region name", (400,))
             for name in BAD_REGION_NAMES]
    taken = Mutation("a region already registered", _set(lambda r: r, "region", setup.frames_region),
                     r"already registered", (400,))
    return {"key": _field_mutations("key", _registration_json, "key", keys, r"key|segment", (400,)),
            "offset": _field_mutations("offset", _registration_json, "offset", offsets, r"offset", (400,)),
            "byte_size": _field_mutations("byte_size", _registration_json, "byte_size", sizes, r"byte_size", (400,)),
            "region": [*names, taken], "body": replaced}


def _input_parameters(request: dict) -> dict:
    return request["inputs"][0].setdefault("parameters", {})


def _output_parameters(request: dict) -> dict:
    return request["outputs"][0].setdefault("parameters", {})


def shm_infer_mutations(setup: ShmSetup) -> dict[str, list[Mutation]]:
    """The ways to break a good shared-memory inference, by what they break: the input's or the output's region,
    byte size or offset, or the tensor around them."""
    fits, found = (400,), (400, 404)
    sizes = [MISSING, *NUMBER_GARBAGE, 2**63, 0]
    return {
        "input region": _field_mutations("input region", _input_parameters, SHM_REGION,
                                         [*REGION_GARBAGE, setup.labels_region], r"shared[-_]memory|region", found),
        "input size": _field_mutations("input byte size", _input_parameters, SHM_BYTE_SIZE,
                                       [*sizes, FRAME_BYTES - 1, FRAME_BYTES + 1],
                                       r"shared_memory_byte_size|bytes in shared memory|bytes runs past", (400, 413)),
        "input offset": _field_mutations("input offset", _input_parameters, SHM_OFFSET,
                                         [*NUMBER_GARBAGE, 1, FRAME_BYTES, 2**64], r"shared_memory_offset|offset \d+",
                                         fits),
        "output region": _field_mutations("output region", _output_parameters, SHM_REGION, REGION_GARBAGE,
                                          r"shared[-_]memory|region", found),
        "output size": _field_mutations("output byte size", _output_parameters, SHM_BYTE_SIZE,
                                        [*sizes, 1, setup.label_bytes - 1, setup.label_bytes + 1],
                                        r"shared_memory_byte_size|\+ \d+ bytes runs past", fits),
        "output offset": _field_mutations("output offset", _output_parameters, SHM_OFFSET,
                                          [*NUMBER_GARBAGE, 1, 2**31], r"shared_memory_offset|offset \d+", fits),
        "tensor": _tensor_mutations()}


def _tensor_mutations() -> list[Mutation]:
    """A region-placed input that is also something else: data in the request too, another datatype or shape."""
    edits = {"data in the request too": ("data", [0] * FRAME_BYTES), "datatype BYTES": ("datatype", "BYTES"),
             "datatype FP32": ("datatype", "FP32"), "shape [1, 32, 33, 3]": ("shape", [1, SIDE, SIDE + 1, 3]),
             "shape [2, 32, 32, 3]": ("shape", [2, SIDE, SIDE, 3]), "name images": ("name", "images")}
    says = r"shared-memory region and in the request|BYTES|need|must be FP32"
    mutations = [Mutation(f"region input with {name}", _set(lambda r: r["inputs"][0], key, value), says, (400,))
                 for name, (key, value) in edits.items()]
    binary = Mutation("region input with binary_data_size too", _set(_input_parameters, "binary_data_size",
                                                                     FRAME_BYTES), says, (400,))
    return [*mutations, binary]
