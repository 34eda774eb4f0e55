"""Malformed inference requests, drawn at random, for the decoder's tests and the service's fuzz run
(`bench/serve_fuzz.py`): a valid request with 1-3 of its fields replaced by garbage, and whole bodies that are
wrong at the byte level (cut-off binary parts, headers that lie about lengths, compressed garbage, wrong content
types). Each form once answered 500 or held memory somewhere; none may now."""

from __future__ import annotations

import copy
import gzip
import json

import numpy as np

from serving.protocol import HEADER_LENGTH


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
