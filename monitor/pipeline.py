"""The flip monitor: camera streams through one served engine, a flip detector per stream, events out.

The loop takes the newest frame of every stream (each stream's buffer already dropped what the monitor could
not keep up with, so latency stays bounded), segments the frames of the same size in one engine call (batching
across streams), feeds each stream's `FlipDetector`, and sends alarms and stream events to its sinks. It holds
an `Engine` and nothing else: a `RemoteEngine` (the OIP endpoint from outside the cluster), a Serve-handle
engine inside it, or a local ONNX engine on a vehicle.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from export import Engine
from monitor.flips import FlipAlarm, FlipConfig, FlipDetector
from monitor.streams import Stream, StreamEvent, StreamFrame


class JsonLinesSink:
    """Every event as one JSON line, flushed at once: a crash loses nothing already reported."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def __call__(self, event: dict) -> None:
        line = json.dumps(event, default=_jsonable)
        with self._lock, self.path.open("a") as handle:
            handle.write(line + "\n")
            handle.flush()


class WebhookSink:
    """POSTs every event as JSON to `url` from a background thread with a bounded queue: a slow or dead receiver
    costs the monitor nothing (events beyond `capacity` waiting are counted as dropped, failures as failed)."""

    def __init__(self, url: str, timeout: float = 5.0, capacity: int = 1000):
        import requests

        self.url, self.timeout = url, timeout
        self._session = requests.Session()
        self._queue: queue.Queue = queue.Queue(capacity)
        self.sent = self.failed = self.dropped = 0
        self._thread = threading.Thread(target=self._send_loop, name="webhook", daemon=True)
        self._thread.start()

    def __call__(self, event: dict) -> None:
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.dropped += 1

    def _send_loop(self) -> None:
        while True:
            event = self._queue.get()
            if event is None:
                return
            try:
                answer = self._session.post(self.url, data=json.dumps(event, default=_jsonable),
                                            headers={"Content-Type": "application/json"}, timeout=self.timeout)
                if answer.ok:
                    self.sent += 1
                else:
                    self.failed += 1
            except Exception:  # a receiver's trouble is counted, never raised into the monitor
                self.failed += 1

    def close(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


#: backends that compute somewhere else (another process or machine): they take none of this process's cores
REMOTE_BACKENDS = ("oip:", "serve:", "process:")


def engine_computes_here(engine: Engine) -> bool:
    """Whether `engine` computes on this process's CPU cores (a local CPU engine), so detectors share them."""
    return engine.device == "cpu" and not engine.backend.startswith(REMOTE_BACKENDS)


def default_detect_workers(engine: Engine, max_batch: int) -> int:
    """Detector threads: half the cores beside a local CPU engine (its own threads need the rest), every core but
    one when the engine computes elsewhere (the loop itself, the streams' decoding and the engine's transport need
    that one; measured with the engine in its own process on 2 cores: 1 thread kept 92.9 % of its frames/s, 2
    threads 90.6 %); never more than a batch holds frames."""
    cores = os.cpu_count() or 2
    return max(1, min(max_batch, cores // 2 if engine_computes_here(engine) else cores - 1))


@dataclass
class StreamStats:
    processed: int = 0
    alarms: int = 0
    first: float | None = None
    last: float | None = None
    latencies: collections.deque = field(default_factory=lambda: collections.deque(maxlen=256))

    def as_dict(self, stream: Stream) -> dict:
        span = (self.last - self.first) if self.first is not None and self.last and self.last > self.first else 0.0
        latencies = np.array(self.latencies) * 1000.0 if self.latencies else np.array([np.nan])
        return {"processed": self.processed, "alarms": self.alarms,
                "fps": (self.processed - 1) / span if span > 0 else 0.0,
                "latency_ms_p50": float(np.median(latencies)), "latency_ms_p95": float(np.percentile(latencies, 95)),
                "read": stream.read_count, "dropped": stream.buffer.dropped, "bad_frames": stream.bad_frames,
                "reconnects": stream.reconnects, "source_fps": stream.fps, "pace_fps": stream.pace,
                "ended": stream.ended.is_set()}


def same_model(engine: Engine, counterfactual: Engine) -> None:
    """A counterfactual must ask the model the monitor watches: another model's labels would 'revert' anywhere."""
    if counterfactual is engine:
        return
    ours, theirs = engine.spec, counterfactual.spec
    if [c.name for c in ours.classes] != [c.name for c in theirs.classes]:
        raise ValueError(f"the counterfactual engine's classes {[c.name for c in theirs.classes]} are not the "
                         f"engine's {[c.name for c in ours.classes]}")
    if ours.checkpoint_digest and theirs.checkpoint_digest and ours.checkpoint_digest != theirs.checkpoint_digest:
        raise ValueError(f"the counterfactual engine runs checkpoint {theirs.checkpoint_digest}, the engine "
                         f"{ours.checkpoint_digest}: give a copy of the engine's own model")


class Monitor:
    """Streams -> batched engine calls -> one `FlipDetector` per stream -> sinks."""

    def __init__(self, engine: Engine, sinks=(), flip_config: FlipConfig = FlipConfig(), max_batch: int = 8,
                 on_frame=None, confirm=None, detect_workers: int | None = None, detector_lag: int = 2,
                 counterfactual_engine: Engine | None = None):
        if detector_lag < 1:
            raise ValueError(f"detector_lag must be at least 1 (batches whose detectors may still run), got "
                             f"{detector_lag}")
        self.engine, self.sinks, self.flip_config, self.max_batch = engine, list(sinks), flip_config, max_batch
        # where the detectors' counterfactuals run: by default the engine itself; a local copy on the monitor's own
        # core spares an engine computing elsewhere every counterfactual call (bench/monitor_throughput.py)
        self.counterfactual_engine = counterfactual_engine or engine
        same_model(engine, self.counterfactual_engine)
        # batches whose detectors may still be running while the engine segments the next one: at 2, a detector
        # waiting for its counterfactual's engine call holds up nothing (the engine is busy with that call, and
        # the loop's next batch queues behind it instead of waiting for the detector to finish)
        self.detector_lag = detector_lag
        self.on_frame = on_frame  # called with (StreamFrame, labels, alarms) after each frame: the web page's feed
        self.confirm = confirm  # e.g. audit.confirm.VGattConfirmer(twin): (rgb, region, to_class) -> evidence
        self.streams: dict[str, Stream] = {}
        self.detectors: dict[str, FlipDetector] = {}
        self.stats: dict[str, StreamStats] = {}
        self.alarms: list[FlipAlarm] = []
        self.events: list[StreamEvent] = []
        self.engine_errors = 0
        self._stop = threading.Event()
        # a batch holds one frame per stream, so its detectors can run side by side (OpenCV and NumPy release the
        # GIL); half the cores beside a local CPU engine, all of them when it computes elsewhere
        self.detect_workers = detect_workers or default_detect_workers(engine, max_batch)
        self._detect_pool = ThreadPoolExecutor(max_workers=self.detect_workers, thread_name_prefix="flip-detect")
        self._pending: collections.deque[list[Future]] = collections.deque()  # batches, oldest first
        self._latest: dict[str, Future] = {}  # each stream's newest detector run: the next one starts after it
        self._confirm_lock = threading.Lock()
        self._names = [c.name for c in engine.spec.classes]

    def add(self, stream: Stream) -> Stream:
        if stream.name in self.streams:
            raise ValueError(f"a stream named {stream.name!r} is already monitored")
        stream.on_event = self._on_stream_event
        self.streams[stream.name] = stream
        # the counterfactual re-segments a frame with new blobs with the same model (one batched call)
        self.detectors[stream.name] = FlipDetector(self._names, stream.name, self.flip_config,
                                                   relabel=self.counterfactual_engine.segment)
        self.stats[stream.name] = StreamStats()
        return stream

    def _emit(self, event: dict) -> None:
        for sink in self.sinks:
            try:
                sink(event)
            except Exception as exc:  # a broken sink must not stop the monitor; say so once per event
                print(f"patchwatch monitor: sink {sink!r} failed: {exc}")

    def _on_stream_event(self, event: StreamEvent) -> None:
        self.events.append(event)
        self._emit(event.as_dict())

    def step(self) -> int:
        """Segment the newest frame of every stream that has one; returns how many frames were taken.

        The detectors of a batch run on helper threads while the engine segments the next ones (the engine call,
        local or in another process, holds no GIL while it waits; OpenCV and NumPy release it), at most
        `detector_lag` batches behind, so latency and the frames held stay bounded; each stream's frames go
        through its detector in order. The engine waits for the detectors only when they fall that far behind
        (bench/monitor_throughput.py reports the share of time in engine calls)."""
        frames = [frame for stream in self.streams.values() if (frame := stream.buffer.take()) is not None]
        by_shape: dict[tuple, list[StreamFrame]] = collections.defaultdict(list)
        for frame in frames:
            by_shape[frame.rgb.shape].append(frame)
        for group in by_shape.values():
            for start in range(0, len(group), self.max_batch):
                batch = group[start:start + self.max_batch]
                labels = self._segment(batch)
                self._wait_until(self.detector_lag - 1)
                if labels is not None:
                    self._pending.append([self._submit(frame, label) for frame, label in zip(batch, labels)])
        return len(frames)

    def _submit(self, frame: StreamFrame, label: np.ndarray) -> Future:
        """The frame's detector run, after the stream's previous one (a pool thread takes runs in the order they
        were submitted, so the one it may wait for is already running or done)."""
        future = self._detect_pool.submit(self._detect_after, self._latest.get(frame.stream), frame, label)
        self._latest[frame.stream] = future
        return future

    def _detect_after(self, previous: Future | None, frame: StreamFrame, label: np.ndarray) -> None:
        if previous is not None:
            wait([previous])  # its own error surfaces where it is collected, not here again
        self._detect(frame, label)

    def _wait_until(self, batches: int) -> None:
        """Wait for the oldest batches' detectors until at most `batches` are still running (errors surface)."""
        while len(self._pending) > batches:
            for future in self._pending.popleft():
                future.result()

    def drain(self) -> None:
        """Wait for every batch whose detectors are still running."""
        self._wait_until(0)

    def _segment(self, group: list[StreamFrame]) -> np.ndarray | None:
        try:
            return self.engine.segment(np.stack([frame.rgb for frame in group]))
        except Exception as exc:  # an engine hiccup (a restarting replica, a timeout) costs frames, not the loop
            self.engine_errors += 1
            for frame in group:
                self._on_stream_event(StreamEvent(frame.stream, "engine_error", f"{type(exc).__name__}: {exc}",
                                                  index=frame.index))
            return None

    def _detect(self, frame: StreamFrame, label: np.ndarray) -> None:
        stats = self.stats[frame.stream]
        try:
            alarms = self.detectors[frame.stream].update(frame.index, frame.rgb, label)
        except Exception as exc:  # one stream's odd frame must not stop the others
            self._on_stream_event(StreamEvent(frame.stream, "detector_error", f"{type(exc).__name__}: {exc}",
                                              index=frame.index))
            alarms = []
        done = time.monotonic()  # end to end: captured -> labelled -> judged
        stats.processed += 1
        stats.first = stats.first if stats.first is not None else done
        stats.last = done
        stats.latencies.append(done - frame.captured)
        for alarm in alarms:
            alarm.evidence.setdefault("latency_ms", round((done - frame.captured) * 1000.0, 1))
            if self.confirm is not None:
                try:
                    with self._confirm_lock:  # one twin: its attributions go one at a time
                        alarm.evidence["vgatt"] = self.confirm(frame.rgb, alarm.region, alarm.to_class, alarm.trigger)
                except Exception as exc:  # evidence is optional; the alarm goes out regardless
                    alarm.evidence["vgatt"] = {"error": f"{type(exc).__name__}: {exc}"}
            stats.alarms += 1
            self.alarms.append(alarm)
            self._emit(alarm.as_dict())
        if self.on_frame is not None:
            self.on_frame(frame, label, alarms)

    def run(self, duration: float | None = None, idle_sleep: float = 0.002) -> dict:
        """Start the streams and process until every stream ended, `duration` passed, or `stop()`."""
        for stream in self.streams.values():
            if stream._thread is None:
                stream.start()
        deadline = None if duration is None else time.monotonic() + duration
        try:
            while not self._stop.is_set() and (deadline is None or time.monotonic() < deadline):
                if not self.step():
                    if all(s.ended.is_set() and not len(s.buffer) for s in self.streams.values()):
                        break
                    time.sleep(idle_sleep)
        finally:
            self.drain()
            for stream in self.streams.values():
                stream.stop()
        return self.summary()

    def stop(self) -> None:
        self._stop.set()

    def summary(self) -> dict:
        return {"engine": self.engine.describe(), "engine_errors": self.engine_errors,
                "detect_workers": self.detect_workers,
                "alarms": len(self.alarms), "events": len(self.events),
                "streams": {name: self.stats[name].as_dict(stream) for name, stream in self.streams.items()}}
