"""The Open Inference Protocol's system shared-memory extension: a client on the same node registers a POSIX
shared-memory segment (`shm_open`, as `tritonclient.utils.shared_memory` creates them) as a named region, then
names the region instead of sending tensor bytes: inputs are read from it and outputs written into it, so frames
and label maps do not cross HTTP or gRPC.

Routes (Triton's and KServe's): `GET /v2/systemsharedmemory[/region/{name}]/status`,
`POST /v2/systemsharedmemory/region/{name}/register` with `{"key", "offset", "byte_size"}`,
`POST /v2/systemsharedmemory[/region/{name}]/unregister`. A tensor in a region carries the parameters
`shared_memory_region`, `shared_memory_byte_size` and optionally `shared_memory_offset` (from the region's start).

Every region is checked when registered (the segment exists and holds `offset + byte_size` bytes) and every
access against the region's registered size, so nothing is read or written past it. Registrations live in the
ingress replica that took them, as Triton's live in its process: a restarted replica forgets them and clients
register again. Linux: segments are the files under /dev/shm.

The ingress checks a request's regions and passes the model replica `SegmentSlice`s, not the tensors: a replica on
the ingress's node reads the input from the client's segment and writes the outputs into it, so the tensors cross
no process boundary but the client's own (0.7 MB a 360x480 frame and its labels, ~2 ms over Serve's channel). A
replica on another node answers `SegmentElsewhere`, and the ingress sends it the data instead.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serving.protocol import ProtocolError, shown

#: where POSIX shm_open keeps its segments on Linux
SHM_ROOT = Path("/dev/shm")
#: a segment's key: one name under SHM_ROOT, with or without shm_open's leading slash
KEY_PATTERN = re.compile(r"^/?[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")
REGION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
#: the tensor parameters that place a tensor in a region
REGION, BYTE_SIZE, OFFSET = "shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"


@dataclass
class Region:
    name: str
    key: str
    offset: int  # of the region in its segment
    byte_size: int
    mapping: mmap.mmap

    def status(self) -> dict:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}


@dataclass(frozen=True)
class Placement:
    """Where one tensor lives: `byte_size` bytes at `offset` from the start of region `region`."""

    region: str
    byte_size: int
    offset: int = 0

    def parameters(self) -> dict[str, Any]:
        return {REGION: self.region, BYTE_SIZE: self.byte_size} | ({OFFSET: self.offset} if self.offset else {})


class SegmentElsewhere(Exception):
    """A model replica got slices of a segment on another node than its own: the ingress sends the data instead."""


@dataclass(frozen=True)
class SegmentSlice:
    """`byte_size` bytes from `start` of the POSIX segment `key` of node `node_id`: where a model replica on that
    node reads a request's input or writes an output (checked against the region by the ingress)."""

    key: str
    start: int
    byte_size: int
    node_id: str

    def read(self, root: Path = SHM_ROOT) -> bytes:
        with self._mapped(root) as mapping:
            return mapping[self.start:self.start + self.byte_size]

    def write(self, data: bytes, what: str, root: Path = SHM_ROOT) -> None:
        if len(data) > self.byte_size:
            raise ProtocolError(f"{what} is {len(data)} bytes, more than its {BYTE_SIZE} of {self.byte_size}")
        with self._mapped(root) as mapping:
            mapping[self.start:self.start + len(data)] = data

    @contextlib.contextmanager
    def _mapped(self, root: Path):
        """The segment mapped, refused when it no longer holds the slice (a client that shrank or removed it
        after registering must get an error, not a bus error past the end of the file)."""
        try:
            descriptor = os.open(root / self.key.lstrip("/"), os.O_RDWR)
        except OSError as exc:
            raise ProtocolError(f"shared-memory segment {self.key!r} cannot be opened any more: {exc.strerror}") \
                from None
        try:
            size = os.fstat(descriptor).st_size
            if self.start + self.byte_size > size:
                raise ProtocolError(f"shared-memory segment {self.key!r} holds {size} bytes now, less than its "
                                    f"region needs ({self.start + self.byte_size})")
            mapping = mmap.mmap(descriptor, size)
        finally:
            os.close(descriptor)
        try:
            yield mapping
        finally:
            mapping.close()


@dataclass(frozen=True)
class WrittenOutput:
    """What a replica answers for an output it wrote into a segment: the shape and dtype the answer states."""

    shape: tuple[int, ...]
    dtype: object  # a numpy dtype
    nbytes: int


def placement(parameters: dict, what: str) -> Placement | None:
    """The region a tensor's parameters name, checked for form; None when they name none."""
    if REGION not in parameters:
        return None
    region, size, offset = parameters[REGION], parameters.get(BYTE_SIZE), parameters.get(OFFSET, 0)
    if not isinstance(region, str) or not region:
        raise ProtocolError(f"{what}: {REGION} must be a region's name, got {shown(region)}")
    for field, value in ((BYTE_SIZE, size), (OFFSET, offset)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ProtocolError(f"{what}: {field} must be a non-negative integer, got {shown(value)}")
    return Placement(region, size, offset)


class SharedMemoryRegistry:
    """The regions registered with one ingress replica (thread-safe: requests decode on worker threads)."""

    def __init__(self, max_bytes: int, root: Path = SHM_ROOT):
        self.max_bytes, self.root = max_bytes, root
        self._regions: dict[str, Region] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------ control
    def register(self, name: str, request: Any) -> None:
        if not REGION_PATTERN.match(name):
            raise ProtocolError(f"region name {shown(name)} is not valid (letters, digits, '_', '.', '-')")
        key, offset, byte_size = self._registration(request)
        path = self.root / key.lstrip("/")
        try:
            descriptor = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise ProtocolError(f"region {name!r}: no shared-memory segment {key!r} on this node (create it "
                                f"with shm_open first; this extension serves clients on the service's node)") from None
        except OSError as exc:
            raise ProtocolError(f"region {name!r}: cannot open shared-memory segment {key!r}: {exc.strerror}") \
                from None
        try:
            segment = os.fstat(descriptor).st_size
            if offset + byte_size > segment:
                raise ProtocolError(f"region {name!r}: offset {offset} + byte_size {byte_size} runs past the end "
                                    f"of segment {key!r} ({segment} bytes)")
            mapping = mmap.mmap(descriptor, segment) if segment else None
        finally:
            os.close(descriptor)
        with self._lock:
            if name in self._regions:
                if mapping is not None:
                    mapping.close()
                raise ProtocolError(f"region {name!r} is already registered: unregister it first")
            self._regions[name] = Region(name, key, offset, byte_size, mapping)

    @staticmethod
    def _registration(request: Any) -> tuple[str, int, int]:
        if not isinstance(request, dict):
            raise ProtocolError("a registration is a JSON object with key, offset and byte_size")
        key, offset, byte_size = request.get("key"), request.get("offset", 0), request.get("byte_size")
        if not isinstance(key, str) or not KEY_PATTERN.match(key):
            raise ProtocolError(f"key {shown(key)} is not a shared-memory segment's name (one name, as shm_open's)")
        for field, value in (("offset", offset), ("byte_size", byte_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ProtocolError(f"{field} must be a non-negative integer, got {shown(value)}")
        return key, offset, byte_size

    def unregister(self, name: str | None) -> None:
        """One region, or all of them (`name` None); unregistering a region that is not there is no error,
        as in Triton."""
        with self._lock:
            names = list(self._regions) if name is None else [name] if name in self._regions else []
            for region in (self._regions.pop(n) for n in names):
                if region.mapping is not None:
                    region.mapping.close()

    def status(self, name: str | None) -> list[dict]:
        with self._lock:
            if name is None:
                return [region.status() for region in self._regions.values()]
            return [self._region(name).status()]

    def _region(self, name: str) -> Region:
        region = self._regions.get(name)
        if region is None:
            raise ProtocolError(f"no shared-memory region {shown(name)} is registered", status=404)
        return region

    # ------------------------------------------------------------------------------------------- tensors
    def read_input(self, parameters: dict, expected: int | None, what: str) -> bytes:
        """A copy of the bytes of the input whose `parameters` place it in a region; `expected`: what its shape and
        datatype need (None for BYTES, whose size only its data says). At most `max_bytes`, as a body."""
        place = placement(parameters, what)
        if expected is not None and place.byte_size != expected:
            raise ProtocolError(f"{what}: {BYTE_SIZE} is {place.byte_size}, but its shape and datatype need "
                                f"{expected} bytes")
        if place.byte_size > self.max_bytes:
            raise ProtocolError(f"{what}: {place.byte_size} bytes in shared memory, over the limit of "
                                f"{self.max_bytes} a request may carry", status=413)
        with self._lock:
            start = self._start(place, place.byte_size, what)
            mapping = self._regions[place.region].mapping
            return bytes(mapping[start:start + place.byte_size]) if place.byte_size else b""

    def check_output(self, parameters: dict, what: str) -> None:
        """Before the engine runs: the region an output's `parameters` name is registered and holds their byte
        size at their offset (`write_output` checks again: a region may go in between)."""
        self.segment_slice(parameters, what, node_id="")

    def segment_slice(self, parameters: dict, what: str, node_id: str) -> SegmentSlice:
        """The part of a segment that a tensor's `parameters` place it in (checked as `check_output` checks), for a
        replica on node `node_id` to read or write."""
        place = placement(parameters, what)
        with self._lock:
            start = self._start(place, place.byte_size, what)
            return SegmentSlice(self._regions[place.region].key, start, place.byte_size, node_id)

    def answer_parameters(self, parameters: dict, output, what: str) -> dict:
        """The parameters the answer gives an output placed in a region: one a replica wrote (`WrittenOutput`) as
        it is, else its array written there now."""
        if isinstance(output, WrittenOutput):
            place = placement(parameters, what)
            return Placement(place.region, output.nbytes, place.offset).parameters()
        return self.write_output(parameters, np.ascontiguousarray(output).tobytes(), what)

    def write_output(self, parameters: dict, data: bytes, what: str) -> dict:
        """An output's bytes into the region its requested `parameters` name; the parameters the answer gives
        it. Refused when they do not fit the byte size the client gave."""
        place = placement(parameters, what)
        if len(data) > place.byte_size:
            raise ProtocolError(f"{what} is {len(data)} bytes, more than its {BYTE_SIZE} of {place.byte_size}")
        with self._lock:
            start = self._start(place, place.byte_size, what)
            if data:
                self._regions[place.region].mapping[start:start + len(data)] = data
        return Placement(place.region, len(data), place.offset).parameters()

    def _start(self, place: Placement, size: int, what: str) -> int:
        """Where `size` bytes at the placement begin in the region's segment, refused past the region's end."""
        region = self._region(place.region)
        if place.offset + size > region.byte_size:
            raise ProtocolError(f"{what}: offset {place.offset} + {size} bytes runs past the end of region "
                                f"{place.region!r} ({region.byte_size} bytes)")
        return region.offset + place.offset

    def close(self) -> None:
        self.unregister(None)
