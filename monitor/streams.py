"""Camera streams for the monitor and the edge runner: where frames come from, and how a stream survives its
source.

A `FrameSource` opens, reads one RGB frame at a time and closes. `OpenCVSource` covers video files, RTSP/HTTP
streams and local cameras; `ImageFolderSource` an image file, a folder or a glob of images; `ReplaySource`
frames already in memory (the synthetic cameras are in `monitor.cameras`).

A `Stream` runs one source on its own thread: it reconnects with exponential back-off when the source drops,
turns a malformed or undecodable frame into an event instead of an exception, and hands frames over through a
bounded `FrameBuffer`. Its policy says what happens when the consumer is slower than the source: "latest" keeps
only the newest frame and "drop_oldest" a short queue (latency stays bounded: the right policies for live
cameras), "block" makes the reader wait (back-pressure: a file or a folder loses no frame). Memory is bounded
by the capacity either way. A stream can be paced (`pace`, frames per second): frame n is then read no sooner than
n / pace seconds after the first (`FrameSchedule`), so a file plays as the camera that recorded it delivered it
(`FrameSource.playback_fps`: a video's own rate, `DEFAULT_FILE_FPS` for an image folder). Nothing here imports Ray.
"""

from __future__ import annotations

import collections
import math
import numbers
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from segmenters.data.frames import (STREAM_SCHEMES, VIDEO_SUFFIXES, ImageDecodeError, capture_fps, decode_image,
                                    describe_source, image_files)

POLICIES = ("latest", "drop_oldest", "block")
#: how often a reader blocked on a full buffer ("block") looks whether its stream was stopped
BLOCK_POLL_S = 0.05
#: the rate a file source plays at when it carries none of its own: an image folder, or a video whose container
#: reports no usable rate (25 frames/s: PAL video, and near the 30 of most dashcams)
DEFAULT_FILE_FPS = 25.0
#: a video's reported rate outside this range is taken as missing (containers that do not know report 0, NaN or
#: a time base such as 90000)
VIDEO_FPS_RANGE = (1.0, 240.0)


class SourceError(OSError):
    """A source that cannot be opened or stopped delivering."""


class SourceExhausted(Exception):
    """A finite source (a video file, a synthetic clip) has no more frames: not an error, not retried."""


class BadFrameError(ValueError):
    """One frame the source could not decode (a corrupt file in a folder): a "bad_frame" event, and the source
    goes on with the next frame."""


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

    def playback_fps(self) -> float | None:
        """The rate at which this source's frames came from their camera, to play a recording back as it was
        seen; None for a source that delivers at its own pace (a live camera, a synthetic one)."""
        return None


class OpenCVSource(FrameSource):
    """A video file, an RTSP/HTTP stream, or a local camera (index), read through OpenCV."""

    def __init__(self, target: str | int, name: str | None = None):
        self.target = int(target) if isinstance(target, int) or str(target).isdigit() else str(target)
        self.name = name or describe_source(self.target)
        self._capture: cv2.VideoCapture | None = None

    @property
    def finite(self) -> bool:  # a file ends; a camera or a network stream that stops has dropped
        return isinstance(self.target, str) and not self.target.startswith(STREAM_SCHEMES)

    def playback_fps(self) -> float | None:
        """A video file's own rate (OpenCV's CAP_PROP_FPS; `DEFAULT_FILE_FPS` when it reports none within
        `VIDEO_FPS_RANGE`); None for a camera or a network stream, which deliver in real time themselves."""
        if not self.finite:
            return None
        fps = capture_fps(self.target, default=DEFAULT_FILE_FPS)
        return fps if VIDEO_FPS_RANGE[0] <= fps <= VIDEO_FPS_RANGE[1] else DEFAULT_FILE_FPS

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


class ImageFolderSource(FrameSource):
    """An image file, a folder of images or a glob, decoded in name order by `segmenters.data.frames`' strict
    decoder. A file that does not decode raises `BadFrameError` for its frame; the next read goes on."""

    def __init__(self, pattern: str, name: str | None = None):
        self.files = image_files(pattern)  # FileNotFoundError naming `pattern` when it matches no image
        self.name = name or describe_source(pattern)
        self._position = 0

    @property
    def finite(self) -> bool:
        return True

    def playback_fps(self) -> float:
        """Images carry no frame rate: `DEFAULT_FILE_FPS`."""
        return DEFAULT_FILE_FPS

    def open(self) -> None:
        self._position = 0

    def read(self) -> tuple[np.ndarray, dict | None]:
        if self._position >= len(self.files):
            raise SourceExhausted(self.name)
        file = self.files[self._position]
        self._position += 1
        try:
            return decode_image(file.read_bytes()), None
        except (ImageDecodeError, OSError) as exc:
            raise BadFrameError(f"{file}: {exc}") from exc


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
    monitoring); "drop_oldest" keeps a queue of `capacity` frames, dropping the oldest when full; both count the
    frames replaced before anyone took them as `dropped`. "block" keeps `capacity` frames and makes `put` wait
    while they are all there (back-pressure: nothing is ever dropped, the reader goes at the consumer's pace)."""

    def __init__(self, policy: str = "latest", capacity: int = 4):
        if policy not in POLICIES:
            raise ValueError(f"frame policy must be one of {POLICIES}, got {policy!r}")
        if capacity < 1:
            raise ValueError(f"buffer capacity must be at least 1, got {capacity}")
        self.policy = policy
        self.capacity = 1 if policy == "latest" else capacity
        self._frames: collections.deque[StreamFrame] = collections.deque()
        self._changed = threading.Condition()
        self.dropped = 0

    def put(self, frame: StreamFrame, cancel: threading.Event | None = None) -> bool:
        """Hand `frame` over; under "block" wait for room. False (frame not kept) only when `cancel` was set while
        waiting."""
        with self._changed:
            while self.policy == "block" and len(self._frames) >= self.capacity:
                if cancel is not None and cancel.is_set():
                    return False
                self._changed.wait(BLOCK_POLL_S)
            if len(self._frames) >= self.capacity:
                self._frames.popleft()
                self.dropped += 1
            self._frames.append(frame)
            self._changed.notify_all()
            return True

    def take(self, timeout: float = 0.0) -> StreamFrame | None:
        """The oldest frame held, waiting up to `timeout` seconds for one; None when there is none."""
        with self._changed:
            if not self._frames and timeout > 0:
                self._changed.wait_for(lambda: bool(self._frames), timeout)
            if not self._frames:
                return None
            frame = self._frames.popleft()
            self._changed.notify_all()
            return frame

    def __len__(self) -> int:
        with self._changed:
            return len(self._frames)


@dataclass(frozen=True)
class FrameSchedule:
    """When each frame of a paced stream is due: frame n at `start + n / fps`. Due times count from the first
    frame, not from the previous read, so a slow read delays its own frame only, never the ones after it."""

    fps: float
    start: float  # time.monotonic() at which frame 0 is due

    def __post_init__(self):
        if not (isinstance(self.fps, numbers.Real) and math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"a stream's pace must be a positive number of frames per second, got {self.fps!r}")

    def due(self, index: int) -> float:
        return self.start + index / self.fps


@dataclass
class Backoff:
    """Reconnect delays: `initial` doubling up to `maximum`; `attempts` opens in a row before giving up (None:
    never give up, as a fleet camera should; 1: no retry, as for a file that will not open later either)."""

    initial: float = 0.5
    maximum: float = 10.0
    attempts: int | None = None

    def __post_init__(self):
        if self.attempts is not None and self.attempts < 1:
            raise ValueError(f"back-off attempts must be at least 1 (or None: never give up), got {self.attempts}")

    def delays(self):
        """The waits between one open and the next: `attempts` - 1 of them (endless when attempts is None)."""
        delay, tries = self.initial, 1
        while self.attempts is None or tries < self.attempts:
            yield delay
            delay, tries = min(delay * 2.0, self.maximum), tries + 1


class Stream:
    """One source on its own reader thread, feeding a `FrameBuffer`; events go to `on_event`. With `pace`
    (frames per second) frame n is read no sooner than n / pace seconds after the first (`schedule`); without it,
    as fast as the source delivers (a live camera paces itself; a file is then read as fast as it decodes)."""

    def __init__(self, source: FrameSource, name: str | None = None, policy: str = "latest", capacity: int = 4,
                 backoff: Backoff = Backoff(), on_event=None, pace: float | None = None):
        if pace is not None:
            FrameSchedule(pace, 0.0)  # a bad pace is refused here, not on the reader thread
        self.source, self.name, self.pace = source, name or source.name, pace
        self.schedule: FrameSchedule | None = None  # set when the source is open and frame 0 is due
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
        delays, attempt = self.backoff.delays(), 0
        while True:
            attempt += 1
            try:
                self.source.open()
                return True
            except (SourceError, OSError) as exc:
                delay = next(delays, None)
                if delay is None:
                    self._emit("source_down", f"{exc}; no retry left")
                    self._emit("gave_up", f"{self.name}: no connection after {attempt} attempts ({exc})")
                    return False
                self._emit("source_down", f"{exc}; retry {attempt} in {delay:.1f}s")
                if self._stop.wait(delay):
                    return False

    def _count_read(self) -> float:
        now = time.monotonic()
        self.read_count += 1
        self._read_times.append(now)
        return now

    def _bad_frame(self, reason: str, index: int) -> None:
        self.bad_frames += 1
        self._emit("bad_frame", reason, index)

    def _wait_until_due(self, index: int) -> bool:
        """Wait until frame `index` is due (paced streams only); False when the stream was stopped meanwhile."""
        if self.schedule is None:
            return True
        return not self._stop.wait(max(0.0, self.schedule.due(index) - time.monotonic()))

    def _reconnect(self, reason: str, index: int) -> bool:
        self._emit("source_down", reason, index)
        self.source.close()
        if not self._connect():
            return False
        self.reconnects += 1
        self._emit("reconnected", self.source.name, index)
        return True

    def _run(self) -> None:
        index = 0
        try:
            if not self._connect():
                return
            self._emit("connected", self.source.name)
            if self.pace is not None:
                self.schedule = FrameSchedule(self.pace, time.monotonic())
            while self._wait_until_due(index) and not self._stop.is_set():
                try:
                    rgb, truth = self.source.read()
                except SourceExhausted:
                    self._emit("ended", f"{self.source.name} has no more frames", index)
                    return
                except BadFrameError as exc:  # read, but not decodable: this frame is lost, not the source
                    self._count_read()
                    self._bad_frame(str(exc), index)
                    index += 1
                    continue
                except (SourceError, OSError) as exc:
                    if not self._reconnect(str(exc), index):
                        return
                    continue
                now = self._count_read()
                try:
                    rgb = check_frame(rgb)
                except ValueError as exc:
                    self._bad_frame(str(exc), index)
                    index += 1
                    continue
                if not self.buffer.put(StreamFrame(self.name, index, rgb, now, truth), cancel=self._stop):
                    return  # stopped while waiting for room ("block")
                index += 1
        except Exception as exc:  # a source bug must end this stream with an event, never the monitor
            self._emit("source_down", f"{type(exc).__name__}: {exc}", index)
        finally:
            self.source.close()
            self.ended.set()


def open_source(text: str, fps: float | None = None, frames: int | None = None) -> FrameSource:
    """A source from its command-line form: a video file, an rtsp/http URL, a camera index, an image, a folder or
    glob of images, or `synthetic:INDEX` (a moving camera over shapes val scene INDEX; `fps` paces it, `frames`
    ends it). Campaign trials (`trial:RUN_DIR:TRIAL_ID`) are the command line's: a run is read through `audit`."""
    if text.startswith("synthetic:"):
        from monitor.cameras import SyntheticCamera

        index = text.split(":", 1)[1]
        if not index.isdigit():
            raise ValueError(f"synthetic source wants a scene number, e.g. synthetic:3; got {text!r}")
        return SyntheticCamera(int(index), frames=frames, fps=fps)
    if text.isdigit() or text.startswith(STREAM_SCHEMES) or Path(text).suffix.lower() in VIDEO_SUFFIXES:
        return OpenCVSource(text)
    return ImageFolderSource(text)
