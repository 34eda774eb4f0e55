"""The on-vehicle runner: a verified bundle, no Ray, frames in, label maps and overlays out.

It holds one `Engine` (ONNX Runtime, or TensorRT when the bundle has a plan for this machine), reads
frames through OpenCV, and writes per frame a label PNG (class indices) and/or a colour overlay; for video
and camera input also an overlay video. A frame that cannot be decoded is logged in the summary and
skipped; it never stops the run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from edge.bundle import BundleTargetError, VerifiedBundle, verify_bundle
from export import Engine, OnnxRuntimeEngine
from segmenters.data.frames import Frame, describe_source, iter_frames, capture_fps
from segmenters.files import atomic_write_text
from segmenters.visualize import overlay

RUNTIMES = ("auto", "onnxruntime", "tensorrt")
OUTPUTS = ("labels", "overlay")


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


def run_engine(
    engine: Engine,
    source: str | int,
    out_dir: str | Path,
    *,
    outputs: tuple[str, ...] = OUTPUTS,
    size: tuple[int, int] | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> dict:
    """Segment every frame of `source`; returns (and writes as summary.json) what happened."""
    unknown = set(outputs) - set(OUTPUTS)
    if unknown:
        raise ValueError(f"unknown outputs {sorted(unknown)}; choose from {OUTPUTS}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    palette, spec = engine.spec.palette(), engine.spec
    is_stream = describe_source(source).split()[0] in ("video", "camera", "stream")
    video, errors, frames, infer_s = None, [], 0, 0.0
    areas = np.zeros(spec.num_classes, dtype=np.int64)
    started = time.perf_counter()
    try:
        for item in tqdm(iter_frames(source, limit), desc=f"edge run {engine.backend}", disable=not progress):
            if not isinstance(item, Frame):
                errors.append({"index": item.index, "name": item.name, "error": item.reason})
                continue
            rgb = item.rgb if size is None else cv2.resize(item.rgb, (size[1], size[0]), interpolation=cv2.INTER_AREA)
            t0 = time.perf_counter()
            labels = engine.segment(rgb)[0]
            infer_s += time.perf_counter() - t0
            frames += 1
            areas += np.bincount(labels.ravel(), minlength=spec.num_classes)[: spec.num_classes]
            if "labels" in outputs:
                _write_png(out / "labels" / f"{item.name}.png", labels)
            if "overlay" in outputs:
                picture = overlay(rgb, labels, palette)
                _write_png(out / "overlays" / f"{item.name}.png", cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
                if is_stream:
                    if video is None:
                        video = cv2.VideoWriter(str(out / "overlay.mp4"), cv2.VideoWriter_fourcc(*"mp4v"),
                                                capture_fps(source), (picture.shape[1], picture.shape[0]))
                    video.write(cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
    finally:
        if video is not None:
            video.release()
    elapsed = time.perf_counter() - started
    total = max(int(areas.sum()), 1)
    summary = {
        "source": describe_source(source),
        "engine": engine.describe(),
        "frames": frames,
        "errors": errors,
        "seconds": round(elapsed, 3),
        "fps": round(frames / elapsed, 2) if elapsed > 0 else None,
        "inference_ms_per_frame": round(1000 * infer_s / frames, 2) if frames else None,
        "class_share": {name: round(int(a) / total, 6) for name, a in zip(spec.class_names, areas)},
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


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
