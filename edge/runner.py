"""The on-vehicle runner: a verified bundle, no Ray, frames in, label maps and overlays out.

It holds one `Engine` (ONNX Runtime, or TensorRT when the bundle has a plan for this machine), reads frames
through a `monitor.streams.Stream` (the monitor's reader: reconnects with back-off, bounded buffer) and writes per
frame a label PNG (a palette PNG: class indices, the spec's colours, as the service answers) and/or a colour
overlay; for video and camera input also an overlay video. Frames are segmented at the spec's input size, resized
as `patchwatch eval` resizes (torchvision, bilinear with antialiasing), and the labels are brought back to the
frame's own size (nearest neighbour), so what is written lines up with the frame.
Files, folders and globs are read with back-pressure (policy "block": no frame lost, at most `READ_AHEAD`
decoded ahead); cameras and network streams keep only the newest frame ("latest": the engine sees the present,
frames it had no time for are counted as dropped). A frame that cannot be decoded is logged in the summary
and skipped; it never stops the run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
from torchvision.transforms.v2 import functional as tv_functional
from tqdm import tqdm

from edge.manifest import BundleTargetError
from edge.verify import VerifiedBundle, verify_bundle
from export import Engine, OnnxRuntimeEngine
from export.engine import host_tensor
from monitor.streams import Backoff, FrameSource, ImageFolderSource, Stream, StreamEvent, open_source
from segmenters.data.frames import capture_fps, describe_source
from segmenters.files import atomic_write_text
from segmenters.visualize import overlay, save_label_png

RUNTIMES = ("auto", "onnxruntime", "tensorrt")
OUTPUTS = ("labels", "overlay")
#: frames a file or folder's reader may decode ahead of the engine (policy "block": it then waits)
READ_AHEAD = 4
#: how long the engine's side waits for a frame before looking whether the stream has ended
WAIT_S = 0.1
#: stream events kept in the summary (besides bad frames, which are its "errors")
SOURCE_EVENTS = ("source_down", "reconnected", "gave_up")


def select_engine(bundle: VerifiedBundle, runtime: str = "auto", precision: str | None = None) -> Engine:
    """TensorRT when asked (or, for auto, when a plan fits this machine); otherwise ONNX Runtime."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    manifest = bundle.manifest

    def pick(role: str):
        entries = [e for e in manifest.engines(role) if precision is None or e.precision == precision]
        order = {"fp32": 0, "fp16": 1, "int8": 2}  # default to the most exact engine
        return sorted(entries, key=lambda e: order.get(e.precision or "fp32", 9))

    plans = [e for e in pick("tensorrt") if e.path not in bundle.unchecked_plans]
    if runtime == "tensorrt" or (runtime == "auto" and plans):
        if not plans:
            why = "it has no TensorRT here" if manifest.engines("tensorrt") else "the bundle has no TensorRT plan"
            raise BundleTargetError(f"cannot run with TensorRT: {why}" + (f" at {precision}" if precision else ""))
        from export.tensorrt_engine import TensorRTEngine

        return TensorRTEngine(bundle.path(plans[0]))
    graphs = pick("onnx")
    if not graphs:
        raise BundleTargetError(f"the bundle has no ONNX engine{f' at {precision}' if precision else ''}")
    return OnnxRuntimeEngine(bundle.path(graphs[0]))


def open_stream(source: str | int, backoff: Backoff | None = None, on_event=None) -> Stream:
    """`source` as a (not yet started) `Stream`: a file, folder or glob with policy "block" and one attempt to
    open it (a file that does not open will not open later); a camera or network stream with "latest" and
    `backoff` (default: reconnect for ever, as a vehicle's camera should)."""
    frames = open_source(str(source))
    if backoff is None:
        backoff = Backoff(attempts=1) if frames.finite else Backoff()
    return Stream(frames, policy="block" if frames.finite else "latest", capacity=READ_AHEAD, backoff=backoff,
                  on_event=on_event)


def _taken(stream: Stream, limit: int | None):
    """The stream's frames in order, until it ended or frame `limit` - 1 (counted as read) was reached."""
    while True:
        frame = stream.buffer.take(timeout=WAIT_S)
        if frame is None:
            if stream.ended.is_set() and not len(stream.buffer):  # ended first: it is set after the last put
                return
            continue
        if limit is not None and frame.index >= limit:
            return
        yield frame
        if limit is not None and frame.index >= limit - 1:
            return


def _frame_name(source: FrameSource, stem: str, index: int, suffix: bool = False) -> str:
    """An image's own file name (stem, or with its suffix), else `<stem>_<index>` (a video's or camera's frame)."""
    if isinstance(source, ImageFolderSource):
        file = source.files[index]
        return file.name if suffix else file.stem
    return f"{stem}_{index:06d}"


def _stem(source: str | int) -> str:
    kind, text = describe_source(source).split()[0], str(source)
    return {"camera": f"camera{text}", "stream": "stream"}.get(kind, Path(text).stem)


class FrameWriter:
    """What `run_engine` writes per frame: label PNGs, overlays, and for a video or camera an overlay video."""

    def __init__(self, out: Path, outputs: tuple[str, ...], palette: np.ndarray, video_fps: float | None):
        self.out, self.outputs, self.palette, self.video_fps = out, outputs, palette, video_fps
        self.video: cv2.VideoWriter | None = None

    def write(self, name: str, rgb: np.ndarray, labels: np.ndarray) -> None:
        if "labels" in self.outputs:
            save_label_png(self.out / "labels" / f"{name}.png", labels, self.palette)
        if "overlay" not in self.outputs:
            return
        picture = cv2.cvtColor(overlay(rgb, labels, self.palette), cv2.COLOR_RGB2BGR)
        _write_png(self.out / "overlays" / f"{name}.png", picture)
        if self.video_fps is not None:
            if self.video is None:
                self.video = cv2.VideoWriter(str(self.out / "overlay.mp4"), cv2.VideoWriter_fourcc(*"mp4v"),
                                             self.video_fps, (picture.shape[1], picture.shape[0]))
            self.video.write(picture)

    def close(self) -> None:
        if self.video is not None:
            self.video.release()


def run_engine(
    engine: Engine,
    source: str | int,
    out_dir: str | Path,
    *,
    outputs: tuple[str, ...] = OUTPUTS,
    size: tuple[int, int] | None = None,
    limit: int | None = None,
    progress: bool = True,
    backoff: Backoff | None = None,
) -> dict:
    """Segment the frames of `source` (the first `limit` read: all of a file's, the newest of a camera's) at
    `size` (H, W; default the spec's input size) and write their labels at each frame's own size; returns (and
    writes as summary.json) what happened. `backoff`: a camera's or stream's reconnects (see `open_stream`)."""
    unknown = set(outputs) - set(OUTPUTS)
    if unknown:
        raise ValueError(f"unknown outputs {sorted(unknown)}; choose from {OUTPUTS}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    events: list[StreamEvent] = []
    stream = open_stream(source, backoff, events.append)
    is_video = describe_source(source).split()[0] in ("video", "camera", "stream")
    writer = FrameWriter(out, outputs, engine.spec.palette(), capture_fps(source) if is_video else None)
    stem, frames, infer_s = _stem(source), 0, 0.0
    size = tuple(size or engine.spec.input_size)
    areas = np.zeros(engine.spec.num_classes, dtype=np.int64)
    started = time.perf_counter()
    try:
        stream.start()
        for item in tqdm(_taken(stream, limit), desc=f"edge run {engine.backend}", disable=not progress):
            resized = resize_frame(item.rgb, size)
            t0 = time.perf_counter()
            labels = engine.segment(resized)[0]
            infer_s += time.perf_counter() - t0
            labels = labels_at(labels, item.rgb.shape[:2])
            frames += 1
            areas += np.bincount(labels.ravel(), minlength=engine.spec.num_classes)[: engine.spec.num_classes]
            writer.write(_frame_name(stream.source, stem, item.index), item.rgb, labels)
    finally:
        stream.stop()
        writer.close()
    _refuse_unopened(events, frames, source)
    summary = {"source": describe_source(source), "engine": engine.describe(), "frames": frames,
               "segmented_at": list(size),
               **_stream_report(stream, events, stem, limit), **_timing(frames, time.perf_counter() - started, infer_s),
               "class_share": _shares(areas, engine.spec.class_names)}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def resize_frame(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An (H, W, 3) uint8 frame at `size` (H, W), resized as evaluation resizes its images (torchvision's
    bilinear resize with antialiasing); a frame already at `size` is returned as it is."""
    if tuple(rgb.shape[:2]) == tuple(size):
        return rgb
    resized = tv_functional.resize(host_tensor(np.ascontiguousarray(rgb)).permute(2, 0, 1), list(size),
                                   antialias=True)
    return np.ascontiguousarray(resized.permute(1, 2, 0).numpy())


def labels_at(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A label map brought to `size` (H, W) by nearest neighbour: each pixel takes the label of the model pixel
    its centre falls in (torch's "nearest-exact"; OpenCV's rounds exact boundaries down). Classes, never blends,
    in any integer dtype."""
    if tuple(labels.shape) == tuple(size):
        return labels
    rows = ((np.arange(size[0]) + 0.5) * (labels.shape[0] / size[0])).astype(np.int64)
    cols = ((np.arange(size[1]) + 0.5) * (labels.shape[1] / size[1])).astype(np.int64)
    return labels[rows[:, None], cols[None, :]]


def _refuse_unopened(events: list[StreamEvent], frames: int, source: str | int) -> None:
    """A source that gave up before delivering a frame is an error (OSError naming it), not an empty run."""
    gave_up = [e for e in events if e.kind == "gave_up"]
    if gave_up and frames == 0:
        raise OSError(f"{describe_source(source)}: {gave_up[-1].detail}")


def _stream_report(stream: Stream, events: list[StreamEvent], stem: str, limit: int | None) -> dict:
    """Bad frames as "errors" (index, name, reason), frames the buffer dropped, and the source's own events."""
    bad = [e for e in events if e.kind == "bad_frame" and (limit is None or e.index < limit)]
    return {
        "errors": [{"index": e.index, "name": _frame_name(stream.source, stem, e.index, suffix=True), "error": e.detail}
                   for e in sorted(bad, key=lambda e: e.index)],
        "dropped": stream.buffer.dropped,
        "source_events": [{"kind": e.kind, "detail": e.detail, "index": e.index}
                          for e in events if e.kind in SOURCE_EVENTS],
    }


def _timing(frames: int, elapsed: float, infer_s: float) -> dict:
    return {"seconds": round(elapsed, 3), "fps": round(frames / elapsed, 2) if elapsed > 0 else None,
            "inference_ms_per_frame": round(1000 * infer_s / frames, 2) if frames else None}


def _shares(areas: np.ndarray, names) -> dict:
    total = max(int(areas.sum()), 1)
    return {name: round(int(a) / total, 6) for name, a in zip(names, areas)}


def run_bundle(
    bundle_path: str | Path,
    public_key: str | Path,
    source: str | int,
    out_dir: str | Path,
    *,
    runtime: str = "auto",
    precision: str | None = None,
    **options,
) -> dict:
    """Verify, then run: nothing executes from a bundle that fails any check."""
    with verify_bundle(bundle_path, public_key) as bundle:
        engine = select_engine(bundle, runtime, precision)
        summary = run_engine(engine, source, out_dir, **options)
        summary["bundle"] = {"name": bundle.manifest.name, "signer": bundle.manifest.signer,
                             "unchecked_plans": bundle.unchecked_plans}
        atomic_write_text(Path(out_dir) / "summary.json", json.dumps(summary, indent=2))
        return summary


def _write_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"could not write {path}")
