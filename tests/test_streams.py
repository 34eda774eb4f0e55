"""Streams and their buffers (`monitor.streams`): what the pipeline promises, judged by what came out (order, no
loss where none is allowed, the buffer's bound, every frame read accounted for), never by how many frames a
loaded machine manages in some time. Real OpenCV captures of a real local MJPEG-over-HTTP server, real files."""

from __future__ import annotations

import http.server
import socketserver
import threading
import time

import cv2
import numpy as np
import pytest

from monitor.streams import (DEFAULT_FILE_FPS, POLICIES, VIDEO_FPS_RANGE, Backoff, BadFrameError, FrameBuffer,
                             FrameSchedule, ImageFolderSource, OpenCVSource, ReplaySource, SourceExhausted, Stream,
                             StreamFrame, check_frame, open_source)


def numbered_clip(count: int, shape=(16, 16, 3)) -> list[np.ndarray]:
    """Frames whose pixels say which frame they are, so order and identity can be checked on what comes out."""
    return [np.full(shape, i % 256, np.uint8) for i in range(count)]


#: grey levels between consecutive frames of `write_video`'s clips (up to 12 frames), far more than JPEG moves them
VIDEO_STEP = 20


def write_video(path, count: int, fps: float, size=(32, 24)):
    """A real MJPG video of `count` frames at `fps` whose grey level says which frame each is."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    assert writer.isOpened(), f"OpenCV cannot write {path}"
    for i in range(count):
        writer.write(np.full((size[1], size[0], 3), VIDEO_STEP * i, np.uint8))
    writer.release()
    return path


def video_frame_number(frame: StreamFrame) -> int:
    return round(float(frame.rgb.mean()) / VIDEO_STEP)


def consume(stream: Stream, pause: float = 0.0) -> tuple[list[StreamFrame], int]:
    """Everything the stream hands over until it ended, taken by a consumer that pauses `pause` s per frame;
    and the most frames its buffer held at any look (one before each take)."""
    taken, most = [], 0
    while True:
        most = max(most, len(stream.buffer))
        frame = stream.buffer.take(timeout=0.05)
        if frame is None:
            if stream.ended.is_set() and not len(stream.buffer):
                return taken, most
            continue
        taken.append(frame)
        time.sleep(pause)


# ------------------------------------------------------------------------------------------------ the buffer
def test_buffer_policies():
    latest, queue = FrameBuffer("latest"), FrameBuffer("drop_oldest", capacity=3)
    for i in range(10):
        frame = StreamFrame("s", i, np.zeros((8, 8, 3), np.uint8), 0.0)
        latest.put(frame)
        queue.put(frame)
    assert len(latest) == 1 and latest.take().index == 9 and latest.dropped == 9
    assert [queue.take().index for _ in range(3)] == [7, 8, 9] and queue.dropped == 7
    assert queue.take() is None and queue.take(timeout=0.01) is None
    with pytest.raises(ValueError, match="frame policy"):
        FrameBuffer("newest")
    with pytest.raises(ValueError, match="capacity"):
        FrameBuffer("block", capacity=0)


def test_block_waits_for_room_and_gives_up_only_when_cancelled():
    buffer, cancel = FrameBuffer("block", capacity=2), threading.Event()
    frames = [StreamFrame("s", i, np.zeros((8, 8, 3), np.uint8), 0.0) for i in range(3)]
    assert buffer.put(frames[0]) and buffer.put(frames[1])
    done = []
    writer = threading.Thread(target=lambda: done.append(buffer.put(frames[2], cancel=cancel)))
    writer.start()
    writer.join(0.2)
    assert writer.is_alive() and len(buffer) == 2  # full: the third waits, nothing is dropped
    assert buffer.take().index == 0
    writer.join(10)
    assert done == [True] and [buffer.take().index for _ in range(2)] == [1, 2] and buffer.dropped == 0

    assert buffer.put(frames[0]) and buffer.put(frames[1])
    cancel.set()
    assert buffer.put(frames[2], cancel=cancel) is False  # a stopped stream's reader does not wait for ever
    assert len(buffer) == 2 and buffer.dropped == 0


# ------------------------------------------------------------------------------------------------ the stream
@pytest.mark.parametrize("policy", POLICIES)
def test_frames_come_out_in_order_and_the_buffer_stays_bounded(policy):
    clip = numbered_clip(40)
    stream = Stream(ReplaySource(clip), policy=policy, capacity=3).start()
    taken, most = consume(stream, pause=0.002)
    indices = [f.index for f in taken]
    assert indices == sorted(set(indices)) and indices  # in order, never twice
    assert all(int(f.rgb[0, 0, 0]) == f.index % 256 for f in taken)  # each index is the frame it names
    assert most <= stream.buffer.capacity == (1 if policy == "latest" else 3)
    assert stream.read_count == len(clip) and stream.bad_frames == 0
    assert len(taken) + stream.buffer.dropped == stream.read_count  # every frame read: taken or counted dropped


@pytest.mark.parametrize("capacity", [1, 2, 7])
def test_block_loses_nothing_whatever_the_capacity_with_a_slow_consumer(capacity):
    stream = Stream(ReplaySource(numbered_clip(30)), policy="block", capacity=capacity).start()
    taken, most = consume(stream, pause=0.003)
    assert [f.index for f in taken] == list(range(30)) and stream.buffer.dropped == 0
    assert most <= capacity


def test_drop_oldest_with_room_for_the_clip_loses_nothing():
    stream = Stream(ReplaySource(numbered_clip(25)), policy="drop_oldest", capacity=25).start()
    stream.ended.wait(10)  # the consumer starts late: everything waits in the buffer
    taken, most = consume(stream, pause=0.001)
    assert [f.index for f in taken] == list(range(25)) and stream.buffer.dropped == 0 and most <= 25


def test_latest_hands_over_the_newest_frame_and_counts_the_rest_dropped():
    """A source far faster than its consumer: the buffer holds one frame, and the frame taken is the newest one
    read (or the one before, when a read was in flight as we took it), never a backlog."""
    stream = Stream(ReplaySource(numbered_clip(3000, (64, 64, 3)), fps=2000), policy="latest").start()
    behind, taken = [], 0
    try:
        while not stream.ended.is_set() and taken < 20:
            time.sleep(0.02)
            read_before = stream.read_count
            frame = stream.buffer.take(timeout=1.0)
            assert len(stream.buffer) <= 1
            if frame is not None:
                taken += 1
                behind.append(read_before - 1 - frame.index)  # frames read after the one handed over
    finally:
        stream.stop()
    rest = len(stream.buffer)
    assert behind and max(behind) <= 1, behind
    assert taken + rest + stream.buffer.dropped == stream.read_count


def test_a_stopped_stream_does_not_hang_on_a_full_blocking_buffer():
    stream = Stream(ReplaySource(numbered_clip(10)), policy="block", capacity=2).start()
    wait_until(lambda: len(stream.buffer) == 2)  # nobody takes: the reader is now waiting for room
    stream.stop(timeout=10)
    assert stream.ended.is_set() and len(stream.buffer) == 2 and stream.buffer.dropped == 0


def test_malformed_frames_become_events():
    good = np.zeros((32, 32, 3), np.uint8)
    nan = np.full((32, 32, 3), np.nan, np.float32)
    junk = [good, np.zeros((32, 32), np.uint8), "not a frame", nan, np.zeros((4, 4, 3), np.uint8), good]
    events = []
    stream = Stream(ReplaySource(junk), policy="drop_oldest", capacity=10, on_event=events.append).start()
    assert stream.ended.wait(10)
    bad = [e for e in events if e.kind == "bad_frame"]
    assert [e.index for e in bad] == [1, 2, 3, 4]
    assert "(H, W, 3)" in bad[0].detail and "str" in bad[1].detail and "non-finite" in bad[2].detail
    assert "too small" in bad[3].detail
    assert [f.index for f in iter(stream.buffer.take, None)] == [0, 5] and events[-1].kind == "ended"
    assert check_frame(np.full((8, 8, 3), 0.5, np.float32)).dtype == np.uint8


# ----------------------------------------------------------------------------------------- image folders
def test_image_folder_reads_in_order_and_a_corrupt_file_is_a_bad_frame_not_the_end(tmp_path):
    for i in range(4):
        cv2.imwrite(str(tmp_path / f"f{i}.png"), np.full((20, 24, 3), 10 * i, np.uint8))
    good = (tmp_path / "f1.png").read_bytes()
    (tmp_path / "f1b.png").write_bytes(good[: len(good) // 2])  # truncated, between f1 and f2
    (tmp_path / "notes.txt").write_text("not an image")
    source = open_source(str(tmp_path))
    assert isinstance(source, ImageFolderSource) and source.finite
    assert [f.name for f in source.files] == ["f0.png", "f1.png", "f1b.png", "f2.png", "f3.png"]
    events = []
    stream = Stream(source, policy="block", capacity=1, backoff=Backoff(attempts=1), on_event=events.append).start()
    taken, _ = consume(stream, pause=0.002)
    assert [f.index for f in taken] == [0, 1, 3, 4]
    assert [int(f.rgb[0, 0, 0]) for f in taken] == [0, 10, 20, 30]
    [bad] = [e for e in events if e.kind == "bad_frame"]
    assert bad.index == 2 and "f1b.png" in bad.detail and "cannot decode" in bad.detail
    assert stream.read_count == 5 and stream.bad_frames == 1 and events[-1].kind == "ended"


def test_image_folder_source_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="no frames at"):
        open_source(str(tmp_path / "nothing*.png"))
    (tmp_path / "x.png").write_bytes(b"")
    source = ImageFolderSource(str(tmp_path))
    source.open()
    with pytest.raises(BadFrameError, match="x.png: empty image"):
        source.read()
    with pytest.raises(SourceExhausted):
        source.read()


def test_open_source_forms(tmp_path):
    assert isinstance(open_source("0"), OpenCVSource) and open_source("0").target == 0
    assert not open_source("rtsp://cam/1").finite and open_source(str(tmp_path / "drive.mp4")).finite
    with pytest.raises(ValueError, match="scene number"):
        open_source("synthetic:x")


# ------------------------------------------------------------------------------------------- pacing files
def test_a_video_plays_at_its_own_rate(tmp_path):
    """Paced at the video's own rate: frame n is read no sooner than n / fps after the first (what a camera
    recording it would have delivered), and with back-pressure every frame still comes out, in order."""
    source = open_source(str(write_video(tmp_path / "drive.avi", 6, fps=20.0)))
    assert source.playback_fps() == 20.0
    stream = Stream(source, policy="block", capacity=8, pace=source.playback_fps()).start()
    taken, _ = consume(stream)
    schedule = stream.schedule
    assert schedule.fps == 20.0 and schedule.due(5) - schedule.due(0) == pytest.approx(5 / 20.0)
    assert [f.index for f in taken] == list(range(6)) == [video_frame_number(f) for f in taken]
    assert all(f.captured >= schedule.due(f.index) for f in taken)  # never ahead of its schedule


def test_unpaced_file_with_back_pressure_delivers_every_frame_in_order(tmp_path):
    """`--every-frame`: no pace, "block": a slow consumer gets every frame of the file, none dropped."""
    stream = Stream(OpenCVSource(str(write_video(tmp_path / "drive.avi", 12, fps=30.0))), policy="block",
                    capacity=2).start()
    taken, most = consume(stream, pause=0.005)
    assert [f.index for f in taken] == list(range(12)) == [video_frame_number(f) for f in taken]
    assert stream.buffer.dropped == 0 and most <= 2 and stream.schedule is None


def test_playback_rate_of_each_kind_of_source(tmp_path):
    cv2.imwrite(str(tmp_path / "f0.png"), np.zeros((16, 16, 3), np.uint8))
    assert open_source(str(tmp_path / "f0.png")).playback_fps() == DEFAULT_FILE_FPS  # images carry no rate
    too_fast = write_video(tmp_path / "timebase.avi", 2, fps=VIDEO_FPS_RANGE[1] * 10)
    assert open_source(str(too_fast)).playback_fps() == DEFAULT_FILE_FPS  # a rate no camera has: not given
    assert open_source(str(tmp_path / "missing.mp4")).playback_fps() == DEFAULT_FILE_FPS
    for live in ("rtsp://cam-7/stream", "http://127.0.0.1:9/cam.mjpg", "0"):  # real time already
        assert open_source(live).playback_fps() is None
    assert ReplaySource(numbered_clip(2), fps=5).playback_fps() is None  # paces itself


def test_a_bad_pace_is_refused_and_a_slow_pace_does_not_hold_up_stop():
    for pace in (0, -1.0, float("nan"), float("inf"), "fast"):
        with pytest.raises(ValueError, match="positive number of frames per second"):
            Stream(ReplaySource(numbered_clip(2)), pace=pace)
    stream = Stream(ReplaySource(numbered_clip(3)), policy="block", capacity=3, pace=0.01).start()  # 100 s a frame
    wait_until(lambda: stream.read_count == 1)  # frame 0 is due at once; frame 1 not for 100 s
    stream.stop(timeout=20)
    assert stream.ended.is_set() and stream.read_count == 1
    assert FrameSchedule(4.0, start=10.0).due(2) == 10.5


# ---------------------------------------------------------------------------------- sources that drop or die
class MjpegServer:
    """A real MJPEG-over-HTTP camera on 127.0.0.1: each connection gets `frames` frames, then the connection
    drops (as a flaky camera's does); it can be stopped and started again on the same port."""

    def __init__(self, frames: int = 8, interval: float = 0.01):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.connections += 1
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                try:
                    for i in range(frames):
                        image = np.full((48, 64, 3), (server.connections * 40 + i * 5) % 255, np.uint8)
                        data = cv2.imencode(".jpg", image)[1].tobytes()
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(data)
                                         + data + b"\r\n")
                        self.wfile.flush()
                        time.sleep(interval)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.handler, self.connections, self.port, self._server = Handler, 0, 0, None

    def start(self):
        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), self.handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self):
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/camera.mjpg"


def wait_until(condition, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_stream_that_drops_comes_back():
    server = MjpegServer(frames=8).start()
    events = []
    stream = Stream(OpenCVSource(server.url, name="cam"), policy="drop_oldest", capacity=100,
                    backoff=Backoff(initial=0.05, maximum=0.2), on_event=events.append).start()
    try:
        wait_until(lambda: stream.reconnects >= 1)
        server.stop()  # now the camera is gone altogether ...
        downs_before = sum(e.kind == "source_down" for e in events)
        wait_until(lambda: sum(e.kind == "source_down" for e in events) >= downs_before + 2)
        server.start()  # ... and back on the same port
        wait_until(lambda: server.connections >= 3 and stream.reconnects >= 2)
    finally:
        stream.stop()
        server.stop()
    kinds = [e.kind for e in events]
    assert kinds[0] == "connected" and "reconnected" in kinds and kinds.count("source_down") >= 3, kinds
    assert stream.read_count >= 16 and stream.reconnects >= 2 and server.connections >= 3
    # every frame read was handed over in order, none lost by the stream itself (the buffer was big enough)
    indices = [frame.index for frame in iter(stream.buffer.take, None)]
    assert indices == sorted(indices) and len(indices) == stream.read_count


def test_dead_source_gives_events_not_a_crash(tmp_path):
    events = []
    stream = Stream(OpenCVSource(str(tmp_path / "missing.mp4")), backoff=Backoff(initial=0.01, attempts=3),
                    on_event=events.append).start()
    assert stream.ended.wait(10)
    kinds = [e.kind for e in events]
    assert kinds == ["source_down"] * 3 + ["gave_up"], kinds
    assert "cannot open video" in events[0].detail and "retry 1" in events[0].detail
    assert "no retry left" in events[2].detail and "after 3 attempts" in events[3].detail


def test_one_attempt_means_no_retry(tmp_path):
    events = []
    stream = Stream(OpenCVSource(str(tmp_path / "missing.mp4")), backoff=Backoff(initial=60, attempts=1),
                    on_event=events.append).start()
    assert stream.ended.wait(30)  # no 60 s wait: there is no retry to wait for
    assert [e.kind for e in events] == ["source_down", "gave_up"] and "cannot open video" in events[1].detail
    with pytest.raises(ValueError, match="at least 1"):
        Backoff(attempts=0)
