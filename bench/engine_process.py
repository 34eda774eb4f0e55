"""An engine in a process of its own: the benchmarks' stand-in for "the engine behind Ray Serve".

`ProcessEngine(path, **options)` spawns a child that loads `export.load_engine(path, **options)` and answers one
call at a time. Arrays cross through shared memory (`transport="shm"`: the parent copies the batch into a segment
the child reads in place, the child writes its answer into another) or through the pipe itself
(`transport="pipe"`: raw bytes received straight into numpy buffers); only a small header is pickled. Shared
memory is the default: 0.33 against 0.47 ms a call for four 128x128 frames (`main()` measures it; either is
under 1 % of an engine call). While the parent waits for the answer it holds no GIL, so its other threads (the
monitor's detectors) run meanwhile.

An error in the child comes back as an `EngineError` naming the call; a child that died says so with its exit
code. `close()` (or leaving the `with` block, or the interpreter exiting) stops the child and frees the segments;
the child also ends by itself when the parent goes away (its pipe closes).

    python bench/engine_process.py --engine bench/results/shapes/unet.onnx   # pipe vs shm cost per call
"""

from __future__ import annotations

import multiprocessing
import threading
import traceback
import weakref
from multiprocessing import shared_memory

import numpy as np

from export.engine import Engine, EngineError, label_dtype
from segmenters.spec import ModelSpec

TRANSPORTS = ("shm", "pipe")


def _attach(name: str | None, cache: dict) -> shared_memory.SharedMemory | None:
    """The child's view of the parent's segment `name` (re-attached only when the parent grew it)."""
    if name is not None and name not in cache:
        for old in cache.values():
            old.close()
        cache.clear()
        cache[name] = shared_memory.SharedMemory(name=name)
    return cache.get(name)


def _answer(conn, methods: dict, message: tuple, inputs: dict, outputs: dict) -> None:
    """One call: read its array (in place from shared memory, or off the pipe), run it, send the result back."""
    method, shape, dtype, in_name, out_name = message
    source = _attach(in_name, inputs)
    array = np.ndarray(shape, dtype, buffer=source.buf) if source else np.empty(shape, dtype)
    if source is None:
        conn.recv_bytes_into(array.reshape(-1))  # flat: the pipe counts items along the first axis
    try:
        result = np.ascontiguousarray(methods[method](array))
        target = _attach(out_name, outputs)
        if target is not None and result.nbytes > target.size:
            raise EngineError(f"the answer {result.dtype}{result.shape} does not fit the {target.size} B segment")
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        return
    if target is not None:
        np.ndarray(result.shape, result.dtype, buffer=target.buf)[...] = result
    conn.send(("ok", result.shape, result.dtype.str))
    if target is None:
        conn.send_bytes(result.reshape(-1))


def _child(conn, path: str, factory, options: dict) -> None:
    """The engine process: load, say what it is, then answer calls until told to stop or the parent is gone."""
    if factory is None:
        from export import load_engine as factory
    try:
        engine = factory(path, **options)
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        return
    conn.send(("ready", engine.spec.model_dump(mode="json"), engine.describe()))
    # "echo" answers at once with labels' shape: what the transport alone costs
    methods = {"segment": engine.segment, "labels": engine.labels, "infer": engine.infer,
               "echo": lambda frames: frames[..., 0]}
    inputs, outputs = {}, {}
    try:
        while (message := conn.recv()) is not None:
            _answer(conn, methods, message, inputs, outputs)
    except (EOFError, OSError, KeyboardInterrupt):  # the parent went away: nothing left to answer
        pass
    finally:
        for segment in [*inputs.values(), *outputs.values()]:
            segment.close()


def _shutdown(process, conn, segments: dict) -> None:
    """Stop the child (politely, then by force) and free the shared memory; safe to call twice."""
    try:
        conn.send(None)
    except (OSError, ValueError):
        pass
    process.join(5)
    if process.is_alive():
        process.terminate()
        process.join(5)
    if process.is_alive():
        process.kill()
        process.join()
    conn.close()
    for segment in segments.values():
        segment.close()
        segment.unlink()
    segments.clear()


class FifoLock:
    """A lock its waiters get in the order they asked for it (`threading.Lock` lets the thread that just released
    it take it again first: a monitor's loop would jump ahead of a detector's counterfactual call, then wait for
    that detector with the engine idle)."""

    def __init__(self):
        self._condition = threading.Condition()
        self._next = self._serving = 0

    def __enter__(self) -> FifoLock:
        with self._condition:
            ticket, self._next = self._next, self._next + 1
            self._condition.wait_for(lambda: self._serving == ticket)
        return self

    def __exit__(self, *exc) -> None:
        with self._condition:
            self._serving += 1
            self._condition.notify_all()


class ProcessEngine(Engine):
    """`export.load_engine(path, **options)` running in a spawned child process, behind the `Engine` interface.
    `factory`: another module-level function (path, **options) -> Engine to build it with."""

    def __init__(self, path: str, transport: str = "shm", start_timeout: float = 120.0, factory=None, **options):
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {transport!r}; expected one of {TRANSPORTS}")
        self.path, self.transport = str(path), transport
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=_child, args=(child_conn, self.path, factory, options), daemon=True,
                                        name="patchwatch-engine")
        self._process.start()
        child_conn.close()
        self._segments: dict[str, shared_memory.SharedMemory] = {}  # "in"/"out" -> segment, owned here
        self._lock = FifoLock()  # calls run in the order they came, as a served engine answers them
        self._closer = weakref.finalize(self, _shutdown, self._process, self._conn, self._segments)
        try:
            if not self._conn.poll(start_timeout):
                raise EngineError(f"engine process for {self.path} did not start within {start_timeout:.0f} s")
            answer = self._receive("start")
        except BaseException:
            self.close()
            raise
        self.spec = ModelSpec.model_validate(answer[1])
        self.child = answer[2]
        self.precision, self.device = self.child["precision"], self.child["device"]
        self.backend = f"process:{self.child['backend']}"

    # ---------------------------------------------------------------------------------------------- calls
    def _receive(self, call: str):
        try:
            answer = self._conn.recv()
        except (EOFError, OSError):
            self._process.join(1)
            raise EngineError(f"engine process died during {call} (exit code {self._process.exitcode})") from None
        if answer[0] == "error":
            raise EngineError(f"engine process failed in {call}: {answer[1]}\n--- in the child:\n{answer[2]}")
        return answer

    def _segment(self, key: str, nbytes: int) -> shared_memory.SharedMemory:
        """The `key` segment, grown (replaced) when a call needs more than it holds."""
        segment = self._segments.get(key)
        if segment is None or segment.size < nbytes:
            if segment is not None:
                segment.close()
                segment.unlink()
            segment = self._segments[key] = shared_memory.SharedMemory(create=True, size=max(nbytes, 1 << 16))
        return segment

    def _call(self, method: str, array: np.ndarray, out_shape: tuple, out_dtype) -> np.ndarray:
        call = f"{method}({array.dtype} array of shape {tuple(array.shape)})"
        out_bytes = int(np.prod(out_shape)) * np.dtype(out_dtype).itemsize
        with self._lock:
            if not self._closer.alive:
                raise EngineError(f"engine process is closed: cannot run {call}")
            names = (None, None)
            if self.transport == "shm":
                source, target = self._segment("in", array.nbytes), self._segment("out", out_bytes)
                np.ndarray(array.shape, array.dtype, buffer=source.buf)[...] = array
                names = (source.name, target.name)
            try:
                self._conn.send((method, array.shape, array.dtype.str, *names))
                if self.transport == "pipe":
                    self._conn.send_bytes(array.reshape(-1))
            except (OSError, ValueError):
                code = self._process.exitcode
                raise EngineError(f"engine process is gone (exit code {code}): cannot run {call}") from None
            _, shape, dtype = self._receive(call)
            result = np.empty(shape, dtype)
            if self.transport == "pipe":
                self._conn.recv_bytes_into(result.reshape(-1))
            else:
                result[...] = np.ndarray(shape, dtype, buffer=self._segments["out"].buf)
            return result

    def _run(self, images: np.ndarray) -> np.ndarray:
        return self._call("infer", images, (images.shape[0], self.spec.num_classes, *images.shape[2:]), np.float32)

    def _labels(self, images: np.ndarray) -> np.ndarray:
        return self._call("labels", images, (images.shape[0], *images.shape[2:]), label_dtype(self.spec))

    def _segment_frames(self, frames: np.ndarray) -> np.ndarray:
        """uint8 frames cross as they are; the child normalises them (4x less to copy than floats)."""
        return self._call("segment", frames, frames.shape[:3], label_dtype(self.spec))

    # ------------------------------------------------------------------------------------------- lifetime
    def close(self) -> None:
        with self._lock:
            self._closer()

    def __enter__(self) -> ProcessEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        """The engine process's id (its CPU time is the engine's)."""
        return self._process.pid

    def describe(self) -> dict:
        return {**super().describe(), "transport": self.transport, "child": self.child}


def transport_cost(path: str, batch: int = 4, calls: int = 300, repeats: int = 5) -> dict:
    """What crossing to the child costs per call, without the network: the child's "echo" answers a batch of
    frames with a label-sized array at once. Median ms per call over `repeats` alternated rounds per transport."""
    import statistics
    import time

    from tqdm import tqdm

    engines = {t: ProcessEngine(path, transport=t, threads=1, device="cpu") for t in TRANSPORTS}
    try:
        size = tuple(engines["shm"].spec.input_size)
        frames = np.random.default_rng(0).integers(0, 255, (batch, *size, 3), dtype=np.uint8)
        rounds = {t: [] for t in TRANSPORTS}
        for _ in tqdm(range(repeats), desc="transport rounds (shm, pipe)"):
            for transport, engine in engines.items():
                started = time.perf_counter()
                for _ in range(calls):
                    labels = engine._call("echo", frames, frames.shape[:3], np.uint8)
                rounds[transport].append(1000 * (time.perf_counter() - started) / calls)
                assert np.array_equal(labels, frames[..., 0])
        return {"batch": batch, "size": size, "calls": calls, "repeats": repeats,
                **{f"{t}_ms_per_call": statistics.median(v) for t, v in rounds.items()}, "rounds": rounds}
    finally:
        for engine in engines.values():
            engine.close()


def main() -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="per-call cost of the engine process's transports")
    parser.add_argument("--engine", default="bench/results/shapes/unet.onnx")
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    print(json.dumps(transport_cost(args.engine, args.batch), indent=1))


if __name__ == "__main__":
    main()
