"""Camera streams for the monitor: where frames come from, and how a stream survives its source.

A `FrameSource` opens, reads one RGB frame at a time and closes. `OpenCVSource` covers video files, RTSP/HTTP
streams and local cameras; `SyntheticCamera` renders a shapes scene from a camera that moves along a smooth
path, and can print a campaign's patch on an object from a known frame on (the ground truth the monitor's
benchmark scores against).

A `Stream` runs one source on its own thread: it reconnects with exponential back-off when the source drops,
turns a malformed frame into an event instead of an exception, and hands frames over through a bounded
`FrameBuffer` whose overload policy ("latest": keep only the newest frame; "drop_oldest": a short queue) keeps
latency and memory bounded however slow the consumer is. Nothing here imports Ray: the edge runner uses it too.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace

import cv2
import numpy as np

from segmenters.data.frames import STREAM_SCHEMES, describe_source

POLICIES = ("latest", "drop_oldest")


class SourceError(OSError):
    """A source that cannot be opened or stopped delivering."""


class SourceExhausted(Exception):
    """A finite source (a video file, a synthetic clip) has no more frames: not an error, not retried."""


@dataclass
class StreamFrame:
    stream: str
    index: int  # the source's own frame counter (gaps are frames the buffer dropped)
    rgb: np.ndarray  # (H, W, 3) uint8
    captured: float  # time.monotonic() when the frame was read: end-to-end latency starts here
    truth: dict | None = None  # synthetic sources: what is in the frame (label maps, decal, flipped pixels)


@dataclass
class StreamEvent:
    """Something that happened to a stream that is not a frame: the monitor logs it beside its alarms."""

    stream: str
    kind: str  # "connected", "source_down", "reconnected", "bad_frame", "ended", "gave_up"
    detail: str
    time: float = field(default_factory=time.time)
    index: int | None = None

    def as_dict(self) -> dict:
        return {"type": "stream", **self.__dict__}


def check_frame(rgb) -> np.ndarray:
    """A frame as the pipeline takes it, or ValueError naming what is wrong with it."""
    if not isinstance(rgb, np.ndarray):
        raise ValueError(f"frame is {type(rgb).__name__}, not an image array")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"frame must be (H, W, 3), got shape {rgb.shape}")
    if rgb.shape[0] < 8 or rgb.shape[1] < 8:
        raise ValueError(f"frame of {rgb.shape[0]}x{rgb.shape[1]} pixels is too small to segment")
    if rgb.dtype != np.uint8:
        if not np.issubdtype(rgb.dtype, np.floating):
            raise ValueError(f"frame must be uint8 (or floats in [0, 1]), got {rgb.dtype}")
        if not np.isfinite(rgb).all():
            raise ValueError("frame has non-finite (NaN or inf) values")
        rgb = to_uint8(rgb)
    return np.ascontiguousarray(rgb)


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


class FrameSource(ABC):
    name: str

    @abstractmethod
    def open(self) -> None:
        """Connect; raise SourceError when the source cannot be reached."""

    @abstractmethod
    def read(self) -> tuple[np.ndarray, dict | None]:
        """The next (H, W, 3) RGB frame and its ground truth (None for real cameras). Raises SourceError when
        the source dropped, SourceExhausted when a finite source ended."""

    def close(self) -> None:
        pass

    @property
    def finite(self) -> bool:
        return False


class OpenCVSource(FrameSource):
    """A video file, an RTSP/HTTP stream, or a local camera (index), read through OpenCV."""

    def __init__(self, target: str | int, name: str | None = None):
        self.target = int(target) if isinstance(target, int) or str(target).isdigit() else str(target)
        self.name = name or describe_source(self.target)
        self._capture: cv2.VideoCapture | None = None

    @property
    def finite(self) -> bool:  # a file ends; a camera or a network stream that stops has dropped
        return isinstance(self.target, str) and not self.target.startswith(STREAM_SCHEMES)

    def open(self) -> None:
        self.close()
        capture = cv2.VideoCapture(self.target)
        if not capture.isOpened():
            capture.release()
            raise SourceError(f"cannot open {describe_source(self.target)}")
        self._capture = capture

    def read(self) -> tuple[np.ndarray, dict | None]:
        if self._capture is None:
            raise SourceError(f"{self.name} is not open")
        ok, image = self._capture.read()
        if not ok or image is None:
            if self.finite:
                raise SourceExhausted(self.name)
            raise SourceError(f"{self.name} delivered no frame")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB), None

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None


class ReplaySource(FrameSource):
    """Frames already in memory, replayed in order (at `fps`, or as fast as they are read): a recorded clip, or
    a benchmark's source that must never be the bottleneck. `loop` replays forever."""

    def __init__(self, frames, name: str = "replay", fps: float | None = None, loop: bool = False):
        self.frames, self.name, self.fps, self.loop = list(frames), name, fps, loop
        self._position, self._next_time = 0, 0.0

    @property
    def finite(self) -> bool:
        return not self.loop

    def open(self) -> None:
        self._position, self._next_time = 0, time.monotonic()

    def read(self) -> tuple[np.ndarray, dict | None]:
        if self._position >= len(self.frames):
            if not self.loop or not self.frames:
                raise SourceExhausted(self.name)
            self._position = 0
        if self.fps:
            self._next_time += 1.0 / self.fps
            time.sleep(max(0.0, self._next_time - time.monotonic()))
        self._position += 1
        return self.frames[self._position - 1], None


class FrameBuffer:
    """The hand-over between a stream's reader thread and the consumer, bounded whatever the consumer does.

    "latest" keeps only the newest frame (a slow consumer always gets the freshest view: the right policy for
    monitoring); "drop_oldest" keeps a short queue of `capacity` frames. Either way frames that are replaced
    before anyone takes them are counted as dropped."""

    def __init__(self, policy: str = "latest", capacity: int = 4):
        if policy not in POLICIES:
            raise ValueError(f"frame policy must be one of {POLICIES}, got {policy!r}")
        if capacity < 1:
            raise ValueError(f"buffer capacity must be at least 1, got {capacity}")
        self.policy = policy
        self.capacity = 1 if policy == "latest" else capacity
        self._frames: collections.deque[StreamFrame] = collections.deque()
        self._lock = threading.Lock()
        self.dropped = 0

    def put(self, frame: StreamFrame) -> None:
        with self._lock:
            if len(self._frames) >= self.capacity:
                self._frames.popleft()
                self.dropped += 1
            self._frames.append(frame)

    def take(self) -> StreamFrame | None:
        with self._lock:
            return self._frames.popleft() if self._frames else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._frames)


@dataclass
class Backoff:
    """Reconnect delays: `initial` doubling up to `maximum`; `attempts` tries in a row before giving up (None:
    never give up, as a fleet camera should)."""

    initial: float = 0.5
    maximum: float = 10.0
    attempts: int | None = None

    def delays(self):
        delay, tries = self.initial, 0
        while self.attempts is None or tries < self.attempts:
            yield delay
            delay, tries = min(delay * 2.0, self.maximum), tries + 1


class Stream:
    """One source on its own reader thread, feeding a `FrameBuffer`; events go to `on_event`."""

    def __init__(self, source: FrameSource, name: str | None = None, policy: str = "latest", capacity: int = 4,
                 backoff: Backoff = Backoff(), on_event=None):
        self.source, self.name = source, name or source.name
        self.buffer = FrameBuffer(policy, capacity)
        self.backoff, self.on_event = backoff, on_event
        self.read_count = self.bad_frames = self.reconnects = 0
        self.ended = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._read_times: collections.deque[float] = collections.deque(maxlen=64)

    def _emit(self, kind: str, detail: str, index: int | None = None) -> None:
        if self.on_event is not None:
            self.on_event(StreamEvent(self.name, kind, detail, index=index))

    def start(self) -> Stream:
        self._thread = threading.Thread(target=self._run, name=f"stream {self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def fps(self) -> float:
        """Frames read per second over the last 64 reads."""
        times = self._read_times
        return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0

    def _connect(self) -> bool:
        """Open the source, retrying with back-off; False when it gave up or the stream was stopped."""
        for attempt, delay in enumerate(self.backoff.delays()):
            try:
                self.source.open()
                return True
            except (SourceError, OSError) as exc:
                self._emit("source_down", f"{exc}; retry {attempt + 1} in {delay:.1f}s")
                if self._stop.wait(delay):
                    return False
        self._emit("gave_up", f"{self.name}: no connection after {self.backoff.attempts} attempts")
        return False

    def _run(self) -> None:
        index = 0
        try:
            if not self._connect():
                return
            self._emit("connected", self.source.name)
            while not self._stop.is_set():
                try:
                    rgb, truth = self.source.read()
                except SourceExhausted:
                    self._emit("ended", f"{self.source.name} has no more frames", index)
                    return
                except (SourceError, OSError) as exc:
                    self._emit("source_down", str(exc), index)
                    self.source.close()
                    if not self._connect():
                        return
                    self.reconnects += 1
                    self._emit("reconnected", self.source.name, index)
                    continue
                now = time.monotonic()
                self.read_count += 1
                self._read_times.append(now)
                try:
                    rgb = check_frame(rgb)
                except ValueError as exc:
                    self.bad_frames += 1
                    self._emit("bad_frame", str(exc), index)
                    index += 1
                    continue
                self.buffer.put(StreamFrame(self.name, index, rgb, now, truth))
                index += 1
        except Exception as exc:  # a source bug must end this stream with an event, never the monitor
            self._emit("source_down", f"{type(exc).__name__}: {exc}", index)
        finally:
            self.source.close()
            self.ended.set()


def open_source(text: str, fps: float | None = None, frames: int | None = None) -> FrameSource:
    """A source from its command-line form: a video file, an rtsp/http URL, a camera index, `synthetic:INDEX`
    (a moving camera over shapes val scene INDEX) or `trial:RUN_DIR:TRIAL_ID[@ONSET]` (the same over a
    campaign trial's scene, its patch appearing at frame ONSET, default 15)."""
    from monitor.cameras import SyntheticCamera, trial_camera

    if text.startswith("synthetic:"):
        index = text.split(":", 1)[1]
        if not index.isdigit():
            raise ValueError(f"synthetic source wants a scene number, e.g. synthetic:3; got {text!r}")
        return SyntheticCamera(int(index), frames=frames, fps=fps)
    if text.startswith("trial:"):
        body, _, onset = text[len("trial:"):].partition("@")
        run, _, trial = body.rpartition(":")
        if not run or not trial or (onset and not onset.isdigit()):
            raise ValueError(f"trial source is trial:RUN_DIR:TRIAL_ID[@ONSET], got {text!r}")
        return trial_camera(run, trial, int(onset or 15), frames=frames, fps=fps)
    return OpenCVSource(text)
