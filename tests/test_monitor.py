"""Streams, the flip detector and the monitor: real renders, real OpenCV captures of a real local MJPEG-over-HTTP
server, a real ONNX engine, real files and a real webhook receiver."""

from __future__ import annotations

import http.server
import json
import socketserver
import threading
import time

import cv2
import numpy as np
import pytest

from monitor.flips import FlipConfig, FlipDetector
from monitor.pipeline import JsonLinesSink, Monitor, WebhookSink
from monitor.cameras import CameraPath, SyntheticCamera
from monitor.streams import Backoff, FrameBuffer, OpenCVSource, ReplaySource, Stream, StreamFrame, check_frame

SHAPES_NAMES = ["background", "cube", "sphere", "cylinder"]


# ------------------------------------------------------------------------------------------ the flip detector
def scene_with_big_object(min_pixels: int = 600) -> tuple[int, int]:
    """(val index, instance) of a shapes scene whose largest object is clearly visible, found by rendering."""
    from segmenters.data.shapes import render_sample

    for index in range(40):
        instances = render_sample(0, "val", index).instances
        counts = np.bincount(instances.reshape(-1))[1:]
        if counts.size and counts.max() >= min_pixels:
            return index, int(counts.argmax()) + 1
    raise AssertionError("no shapes val scene with a large object")


def run_detector(camera: SyntheticCamera, frames: int, flip_from: int | None = None, to_class: int | None = None,
                 config: FlipConfig = FlipConfig()):
    """Feed the renderer's own label maps (a perfect segmenter) through the detector; from `flip_from` on, the
    camera's object reads `to_class` outside the decal, as a successful patch would make it."""
    detector = FlipDetector(SHAPES_NAMES, "test", config)
    camera.open()
    alarms = []
    for index in range(frames):
        rgb, truth = camera.read()
        labels = truth["semantic"].copy()
        if flip_from is not None and index >= flip_from:
            labels[(truth["instances"] == camera.instance) & ~truth["decal"]] = to_class
        alarms += detector.update(index, rgb, labels)
    return detector, alarms


@pytest.fixture(scope="module")
def big_object():
    return scene_with_big_object()


@pytest.mark.parametrize("flow", ["dis-fast", "farneback"])
def test_moving_camera_alone_raises_nothing(big_object, flow):
    index, _ = big_object
    # the labels move with the camera: motion compensation must follow them
    detector, alarms = run_detector(SyntheticCamera(index, frames=40, path=CameraPath(sweep_deg=15, period=40)), 40,
                                    config=FlipConfig(flow=flow))
    assert alarms == [] and detector.untriggered == 0


def test_patch_flip_is_caught_the_frame_after_onset(big_object):
    index, instance = big_object
    # saturated colours, as a found patch has them (MIM's sign steps drive its pixels to the box bounds)
    patch = np.random.default_rng(0).integers(0, 2, (3, 10, 10)).astype(np.float32)
    camera = SyntheticCamera(index, frames=30, patch=patch, instance=instance, onset=15, path=CameraPath(period=60))
    from_class = int(np.bincount(camera.render(15, True).semantic[camera.render(15, True).instances == instance]).argmax())
    to_class = 1 if from_class != 1 else 2
    _, alarms = run_detector(camera, 30, flip_from=15, to_class=to_class)
    assert len(alarms) == 1, [a.as_dict() for a in alarms]
    alarm = alarms[0]
    assert alarm.frame == 16 and alarm.onset_frame == 15  # persist=2: the frame after onset
    assert (alarm.from_class, alarm.to_class) == (from_class, to_class)
    assert alarm.from_name == SHAPES_NAMES[from_class] and alarm.pixels >= 300
    assert alarm.evidence["trigger_pixels"] >= FlipConfig().min_trigger_pixels
    assert alarm.image_change < FlipConfig().image_change
    record = json.loads(json.dumps(alarm.as_dict()))
    assert record["type"] == "flip" and record["transitions"][f"{alarm.from_name}->{alarm.to_name}"] > 0


def test_new_appearance_must_begin_with_the_flip(big_object):
    """A sticker that has been in view for frames before the object's label flips did not cause the flip: the
    detector needs the appearance and the flip to begin on the same frame."""
    index, instance = big_object
    patch = np.random.default_rng(0).integers(0, 2, (3, 10, 10)).astype(np.float32)
    camera = SyntheticCamera(index, frames=30, patch=patch, instance=instance, onset=12, path=CameraPath(period=60))
    detector, alarms = run_detector(camera, 30, flip_from=16, to_class=1)
    assert alarms == [] and detector.untriggered >= 1


def test_flip_without_anything_new_in_view_is_not_an_alarm(big_object):
    index, instance = big_object
    camera = SyntheticCamera(index, frames=24, instance=instance, path=CameraPath(period=60))
    detector, alarms = run_detector(camera, 24, flip_from=12, to_class=1)
    assert alarms == [] and detector.untriggered == 1
    # ... unless the operator asks for every persistent unexplained flip
    _, alarms = run_detector(SyntheticCamera(index, frames=24, instance=instance, path=CameraPath(period=60)), 24,
                             flip_from=12, to_class=1, config=FlipConfig(min_trigger_pixels=0))
    assert len(alarms) == 1 and alarms[0].frame == 13


def test_a_new_object_is_explained_by_the_image():
    """Labels that change because the image changed (something new arrives) are not flips."""
    rng = np.random.default_rng(1)
    background = (rng.random((64, 80, 3)) * 60 + 40).astype(np.uint8)
    detector = FlipDetector(SHAPES_NAMES, "new object")
    for index in range(12):
        rgb, labels = background.copy(), np.zeros((64, 80), np.uint8)
        if index >= 6:  # a bright cube drives in
            rgb[20:50, 30:60] = (230, 40, 40)
            labels[20:50, 30:60] = 1
        assert detector.update(index, rgb, labels) == []
    assert detector.untriggered == 0


def test_detector_refuses_mismatched_labels():
    with pytest.raises(ValueError, match="do not match the frame"):
        FlipDetector(SHAPES_NAMES).update(0, np.zeros((32, 32, 3), np.uint8), np.zeros((16, 16), np.uint8))


# --------------------------------------------------------------------------------------------------- streams
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


def test_stream_that_drops_comes_back():
    server = MjpegServer(frames=8).start()
    events = []
    stream = Stream(OpenCVSource(server.url, name="cam"), policy="drop_oldest", capacity=100,
                    backoff=Backoff(initial=0.05, maximum=0.2), on_event=events.append).start()
    try:
        deadline = time.monotonic() + 20
        while stream.reconnects < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        server.stop()  # now the camera is gone altogether ...
        time.sleep(0.5)
        downs = sum(e.kind == "source_down" for e in events)
        server.start()  # ... and back on the same port
        while server.connections < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        stream.stop()
        server.stop()
    kinds = [e.kind for e in events]
    assert kinds[0] == "connected" and "reconnected" in kinds and downs >= 2, kinds
    assert "refused" in " ".join(e.detail for e in events if e.kind == "source_down") or downs >= 2
    assert stream.read_count >= 16 and stream.reconnects >= 2 and server.connections >= 3
    # every frame read was handed over in order, none lost by the stream itself (the buffer was big enough)
    indices = []
    while (frame := stream.buffer.take()) is not None:
        indices.append(frame.index)
    assert indices == sorted(indices) and len(indices) == stream.read_count


def test_dead_source_gives_events_not_a_crash(tmp_path):
    events = []
    stream = Stream(OpenCVSource(str(tmp_path / "missing.mp4")), backoff=Backoff(initial=0.01, attempts=3),
                    on_event=events.append).start()
    assert stream.ended.wait(10)
    kinds = [e.kind for e in events]
    assert kinds == ["source_down"] * 3 + ["gave_up"], kinds
    assert "cannot open video" in events[0].detail


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


def test_buffer_policies():
    latest, queue = FrameBuffer("latest"), FrameBuffer("drop_oldest", capacity=3)
    for i in range(10):
        frame = StreamFrame("s", i, np.zeros((8, 8, 3), np.uint8), 0.0)
        latest.put(frame)
        queue.put(frame)
    assert len(latest) == 1 and latest.take().index == 9 and latest.dropped == 9
    assert [queue.take().index for _ in range(3)] == [7, 8, 9] and queue.dropped == 7
    with pytest.raises(ValueError, match="frame policy"):
        FrameBuffer("newest")


def test_overloaded_pipeline_keeps_latency_and_memory_bounded():
    """A source far faster than its consumer: the buffer stays at one frame and the frame the consumer gets is
    the newest one read, so latency is one source interval, not a backlog that grows with every frame. Judged
    by frame counts, not by the clock, so a loaded machine cannot make it flaky."""
    frame = np.zeros((64, 64, 3), np.uint8)
    stream = Stream(ReplaySource([frame] * 5000, fps=1000), policy="latest").start()
    behind = []
    try:
        for _ in range(20):
            time.sleep(0.05)  # the consumer: 20 frames/s against a source of ~1000/s
            read_before = stream.read_count
            taken = stream.buffer.take()
            if taken is not None:
                behind.append(read_before - 1 - taken.index)  # frames read after the one handed over
            assert len(stream.buffer) <= 1
    finally:
        stream.stop()
    assert stream.buffer.dropped > 100 and len(behind) >= 15
    assert max(behind) <= 1, behind  # the newest frame (or the one being read as we took it)


# --------------------------------------------------------------------------------------------------- monitor
class Receiver:
    """A real webhook receiver on 127.0.0.1 that stores what it is sent."""

    def __init__(self):
        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/events"

    def close(self):
        self._server.shutdown()
        self._server.server_close()


@pytest.mark.data
def test_monitor_runs_streams_through_an_onnx_engine(tmp_path, camvid_unet_engines, data_root):
    from export import OnnxRuntimeEngine
    from segmenters.data.frames import image_files

    engine = OnnxRuntimeEngine(camvid_unet_engines["1"])
    files = image_files(str(data_root / "camvid" / "val"))[:12]
    video = tmp_path / "drive.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (128, 96))
    for file in files:
        writer.write(cv2.resize(cv2.imread(str(file)), (128, 96), interpolation=cv2.INTER_AREA))
    writer.release()

    receiver = Receiver()
    webhook = WebhookSink(receiver.url)
    log = tmp_path / "events.jsonl"
    frames = []
    # three detector threads: one batch's frames (one per stream) are judged side by side, each stream in order
    monitor = Monitor(engine, sinks=[JsonLinesSink(log), webhook], detect_workers=3,
                      on_frame=lambda f, labels, a: frames.append((f.stream, f.index, labels)))
    monitor.add(Stream(OpenCVSource(str(video), name="drive"), policy="drop_oldest", capacity=64))
    monitor.add(Stream(ReplaySource([np.zeros((96, 128, 3), np.uint8), np.zeros((5, 5), np.uint8)] * 3, name="junk"),
                       policy="drop_oldest", capacity=64))
    monitor.add(Stream(OpenCVSource(str(tmp_path / "gone.mp4"), name="gone"), backoff=Backoff(0.01, attempts=2)))
    with pytest.raises(ValueError, match="already monitored"):
        monitor.add(Stream(OpenCVSource(str(video), name="drive")))
    summary = monitor.run(duration=60)
    webhook.close()
    receiver.close()

    streams = summary["streams"]
    assert streams["drive"]["processed"] == 12 and streams["drive"]["ended"]
    assert streams["junk"]["processed"] == 3 and streams["junk"]["bad_frames"] == 3
    assert streams["gone"]["processed"] == 0 and streams["gone"]["ended"]
    assert all(labels.shape == (96, 128) and labels.max() < engine.spec.num_classes for _, _, labels in frames)
    assert [index for stream, index, _ in frames if stream == "drive"] == list(range(12))
    assert monitor.detectors["drive"].frames == 12 and summary["detect_workers"] == 3
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    kinds = {(e["stream"], e["kind"]) for e in logged if e["type"] == "stream"}
    assert {("drive", "connected"), ("drive", "ended"), ("junk", "bad_frame"), ("gone", "gave_up")} <= kinds
    assert len(receiver.received) == len(logged) and webhook.failed == 0


# -------------------------------------------------------------------------------------------------- the page
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("headless Chromium is not installed (.ci/run installs Debian's chromium)")


@pytest.mark.data
def test_page_shows_streams_and_lists_a_real_alarm_in_headless_chromium(tmp_path, attack_scene, camvid_unet_engines):
    """A real patch attack on the CamVid twin, pasted into a (static-camera) clip from frame 5, streamed through
    the FP32 ONNX engine: the monitor catches the flip, and the page, rendered by headless Chromium running its
    JavaScript, lists the alarm and marks the stream."""
    import subprocess

    import requests
    import torch

    from audit.attack import AttackConfig, class_switch_target, patch_attack
    from audit.patches import EOTConfig, paste, patch_position
    from export import OnnxRuntimeEngine
    from monitor.web import MonitorServer, MonitorView

    browser = chromium()
    twin, image, predicted, obj, source, majority = attack_scene
    target = class_switch_target(obj, majority, source)
    top, left = patch_position(obj, 16)
    result = patch_attack(twin, image, target, 16, top, left,
                          AttackConfig(steps=60, step_size=4 / 255, eot=EOTConfig.none(), eot_samples=1), seed=0)
    attacked = paste(image[None], torch.as_tensor(result.patch), top, left)[0][0]
    to_rgb = lambda chw: (chw.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)  # noqa: E731
    clip = [to_rgb(image)] * 5 + [to_rgb(attacked)] * 5

    from audit.confirm import VGattConfirmer

    confirm = VGattConfirmer(twin)
    monitor = Monitor(OnnxRuntimeEngine(camvid_unet_engines["1"]), sinks=[JsonLinesSink(tmp_path / "events.jsonl")],
                      confirm=confirm)
    monitor.add(Stream(ReplaySource(clip, name="front"), policy="drop_oldest", capacity=16))
    monitor.add(Stream(ReplaySource([to_rgb(image)] * 10, name="rear"), policy="drop_oldest", capacity=16))
    view = MonitorView(monitor)
    server = MonitorServer(view).start()
    try:
        monitor.run(duration=60)
        assert [(a.stream, a.frame, a.onset_frame) for a in monitor.alarms] == [("front", 6, 5)], \
            [(a.bbox, a.pixels, a.transitions, a.evidence) for a in monitor.alarms]
        alarm = monitor.alarms[0]
        assert alarm.from_class == source and alarm.to_class == majority and alarm.pixels >= 50
        # VGatt on the twin (a ReLU U-Net: exact): the flipped pixels' new class draws far more of its evidence
        # from what appeared (the patch) than the same pixels of the clean frame draw from there
        evidence = alarm.evidence["vgatt"]
        assert evidence["exact"] and evidence["completeness_error"] < 1e-6 and evidence["trigger_area_share"] < 0.05
        clean = confirm(to_rgb(image), alarm.region, alarm.to_class, alarm.trigger)
        assert evidence["trigger_share"] > clean["trigger_share"], (evidence, clean)
        assert "region" not in alarm.as_dict() and json.dumps(alarm.as_dict())

        dom = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}",
                              "--virtual-time-budget=4000", "--dump-dom", server.url],
                             capture_output=True, text=True, timeout=90).stdout
        assert '<tr class="alarm-row"><td>front</td><td>6</td><td>5</td>' in dom, dom[-2000:]
        assert f"<td>{alarm.from_name}</td><td>{alarm.to_name}</td><td>{alarm.pixels}</td>" in dom
        assert 'id="fig-front" class="alarm"' in dom and 'id="fig-rear" class="alarm"' not in dom, dom[-3000:]
        subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1000,800",
                        "--virtual-time-budget=4000", f"--screenshot={tmp_path / 'page.png'}", server.url],
                       capture_output=True, timeout=90)
        assert (tmp_path / "page.png").stat().st_size > 10_000

        frame = requests.get(server.url + "streams/front/frame.jpg", timeout=10)
        assert frame.status_code == 200 and frame.headers["content-type"] == "image/jpeg"
        assert cv2.imdecode(np.frombuffer(frame.content, np.uint8), cv2.IMREAD_COLOR).shape[1] == 320
        assert requests.get(server.url + "streams/nope/frame.jpg", timeout=10).status_code == 404
        metrics = requests.get(server.url + "metrics", timeout=10).text
        assert 'patchwatch_monitor_frames_total{stream="front"} 10.0' in metrics
        assert f'patchwatch_monitor_alarms_total{{from_class="{alarm.from_name}",stream="front",to_class="{alarm.to_name}"}} 1.0' in metrics
        assert 'patchwatch_monitor_stream_events_total{kind="ended",stream="rear"} 1.0' in metrics
    finally:
        server.stop()
