"""The flip monitor on synthetic streams with known patch onsets (issue 7's acceptance).

Detection: every patch a campaign found on the shapes twin (bench/campaigns/seed000_shapes.yaml) is printed as a
decal on its object in a moving-camera clip of its scene (each clip its own sweep and phase: varied viewpoints),
appearing at a random onset frame; the same scenes without a patch are the clean clips. Each clip's frames go
through the ONNX engine and a `FlipDetector`. The renderer also tells, per frame, how many of the object's
pixels the decal really flipped (same view rendered without it, through the same engine): a clip whose patch
flips fewer than --min-flip pixels at onset gives the monitor nothing to catch, and is reported apart.
Reported: detection rate within 3 frames of onset, frames from onset to alarm, false alarms per 1000 clean
frames (clean clips plus the frames before onset).

Throughput: the engine's own frames/s at the monitor's batch size, against the whole pipeline (stream threads,
bounded buffers, batching across streams, one detector per stream) over in-memory streams that are never the
bottleneck; the ratio is the share of the engine's throughput the pipeline keeps.

    python bench/monitor.py [--engine bench/results/shapes/unet.onnx] [--run bench/results/seed000_shapes]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm


def clips(run: Path, count: int, frames: int, seed: int):
    rows = sqlite3.connect(run / "trials.sqlite").execute(
        "SELECT id, image_index, object_id FROM trials ORDER BY id").fetchall()[:count]
    rng = np.random.default_rng(seed)
    for trial, index, instance in rows:
        patch = np.load(run / "trials" / trial / "patch.npy")
        onset = int(rng.integers(8, frames - 10))
        path = dict(sweep_deg=float(rng.uniform(6, 18)), tilt_deg=float(rng.uniform(1, 5)),
                    period=int(rng.integers(60, 160)), phase=float(rng.uniform(0, 2 * np.pi)))
        yield trial, index, instance, patch, onset, path


def run_clip(engine, camera, names, frames, config):
    from serving.flips import FlipDetector

    detector = FlipDetector(names, camera.name, config)
    camera.open()
    alarms, truths = [], []
    for index in range(frames):
        rgb, truth = camera.read()
        labels = engine.labels(engine.prepare(rgb[None]))[0]
        alarms += detector.update(index, rgb, labels)
        truths.append({k: truth[k] for k in ("patched", "flipped") if k in truth})
    return alarms, truths, detector.untriggered


def detection(engine, run: Path, args) -> dict:
    from serving.flips import FlipConfig
    from serving.streams import CameraPath, SyntheticCamera

    names = [c.name for c in engine.spec.classes]
    size = tuple(engine.spec.input_size)
    labeler = lambda frames: engine.labels(engine.prepare(frames))  # noqa: E731
    config = FlipConfig()
    patched, clean = [], []
    for trial, index, instance, patch, onset, path in tqdm(list(clips(run, args.clips, args.frames, args.seed)),
                                                          desc="clips (patched + clean)"):
        camera = SyntheticCamera(index, size=size, frames=args.frames, path=CameraPath(**path), patch=patch,
                                 instance=instance, onset=onset, labeler=labeler, seed=args.seed)
        alarms, truths, untriggered = run_clip(engine, camera, names, args.frames, config)
        flipped_at_onset = truths[onset].get("flipped", 0)
        after = [a for a in alarms if a.frame >= onset]
        patched.append({"trial": trial, "scene": index, "onset": onset, "flipped_at_onset": flipped_at_onset,
                        "effective": flipped_at_onset >= args.min_flip,
                        "delay": (after[0].frame - onset) if after else None,
                        "false_before_onset": sum(a.frame < onset for a in alarms), "untriggered": untriggered,
                        "alarm": after[0].as_dict() if after else None})
        camera = SyntheticCamera(index, size=size, frames=args.frames, path=CameraPath(**path), seed=args.seed)
        alarms, _, untriggered = run_clip(engine, camera, names, args.frames, config)
        clean.append({"scene": index, "false": len(alarms), "untriggered": untriggered})

    effective = [p for p in patched if p["effective"]]
    within = [p for p in effective if p["delay"] is not None and p["delay"] <= 3]
    delays = [p["delay"] for p in effective if p["delay"] is not None]
    clean_frames = len(clean) * args.frames + sum(p["onset"] for p in patched)
    false = sum(c["false"] for c in clean) + sum(p["false_before_onset"] for p in patched)
    return {
        "clips_patched": len(patched), "clips_clean": len(clean), "frames_per_clip": args.frames,
        "effective_patches": len(effective), "min_flip_pixels": args.min_flip,
        "detected_within_3": len(within) / max(len(effective), 1),
        "detected_ever": len(delays) / max(len(effective), 1),
        "detected_within_3_all_patched": sum(p["delay"] is not None and p["delay"] <= 3 for p in patched) / len(patched),
        "delay_frames_mean": statistics.mean(delays) if delays else None,
        "delay_frames_median": statistics.median(delays) if delays else None,
        "false_alarms": false, "clean_frames": clean_frames,
        "false_per_1000_clean_frames": 1000.0 * false / max(clean_frames, 1),
        "untriggered_clean": sum(c["untriggered"] for c in clean),
        "config": config.model_dump(), "patched": patched, "clean": clean,
    }


def throughput(engine, args) -> dict:
    """Engine alone vs the monitor pipeline, on the same frames, in the same run."""
    from serving.monitor import Monitor
    from serving.streams import CameraPath, ReplaySource, Stream, SyntheticCamera

    size = tuple(engine.spec.input_size)
    streams, per_stream = args.streams, args.throughput_frames
    frames = []
    for s in range(streams):
        camera = SyntheticCamera(s, size=size, frames=per_stream, path=CameraPath(phase=s))
        camera.open()
        frames.append([camera.read()[0] for _ in range(per_stream)])
    batch = np.stack([clip[0] for clip in frames])
    for _ in range(3):
        engine.labels(engine.prepare(batch))
    started = time.perf_counter()
    for i in range(per_stream):
        engine.labels(engine.prepare(np.stack([clip[i] for clip in frames])))
    engine_fps = streams * per_stream / (time.perf_counter() - started)

    monitor = Monitor(engine, max_batch=streams)
    for s, clip in enumerate(frames):
        # a queue as long as the clip: every frame is processed, so frames/s measures the pipeline, not drops
        monitor.add(Stream(ReplaySource(clip, name=f"cam{s}"), policy="drop_oldest", capacity=per_stream))
    started = time.perf_counter()
    summary = monitor.run(duration=600)
    elapsed = time.perf_counter() - started
    processed = sum(s["processed"] for s in summary["streams"].values())
    pipeline_fps = processed / elapsed
    return {"streams": streams, "frames_per_stream": per_stream, "engine_fps": engine_fps,
            "pipeline_fps": pipeline_fps, "pipeline_fps_per_stream": pipeline_fps / streams,
            "kept_share": pipeline_fps / engine_fps, "processed": processed,
            "engine": engine.describe()}


def plot(result: dict, out: Path) -> None:
    import matplotlib.pyplot as plt

    det = result["detection"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    delays = [p["delay"] for p in det["patched"] if p["effective"] and p["delay"] is not None]
    axes[0].hist(delays, bins=np.arange(-0.5, max(delays + [4]) + 1.5), color="tab:red", alpha=0.8)
    axes[0].axvline(3.5, color="k", ls="--", lw=1)
    axes[0].set(xlabel="frames from patch onset to alarm", ylabel="clips",
                title=f"detected within 3 frames: {det['detected_within_3']:.0%} of {det['effective_patches']}")
    flips = [p["flipped_at_onset"] for p in det["patched"]]
    caught = [p["delay"] is not None and p["delay"] <= 3 for p in det["patched"]]
    axes[1].scatter(flips, np.array(caught, float) + np.random.default_rng(0).uniform(-0.05, 0.05, len(flips)),
                    s=12, alpha=0.7)
    axes[1].axvline(det["min_flip_pixels"], color="k", ls="--", lw=1)
    axes[1].set(xscale="symlog", xlabel="object pixels the patch flipped at onset", yticks=[0, 1],
                yticklabels=["missed", "caught"],
                title=f"false alarms: {det['false_per_1000_clean_frames']:.1f} / 1000 clean frames")
    fig.tight_layout()
    fig.savefig(out / "detection.png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", default="bench/results/shapes/unet.onnx")
    parser.add_argument("--run", default="bench/results/seed000_shapes", help="a campaign run on the shapes twin")
    parser.add_argument("--clips", type=int, default=100)
    parser.add_argument("--frames", type=int, default=36)
    parser.add_argument("--min-flip", type=int, default=40)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--throughput-frames", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/monitor")
    args = parser.parse_args()

    import cv2
    import torch

    from export import OnnxRuntimeEngine

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(1)
    engine = OnnxRuntimeEngine(args.engine)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"throughput": throughput(engine, args), "detection": detection(engine, Path(args.run), args)}
    (out / "monitor.json").write_text(json.dumps(result, indent=1, default=str))
    plot(result, out)
    det, thr = result["detection"], result["throughput"]
    print(json.dumps({k: v for k, v in det.items() if k not in ("patched", "clean", "config")}, indent=1))
    print(json.dumps(thr, indent=1))
    print(f"detected within 3 frames: {det['detected_within_3']:.1%} of {det['effective_patches']} effective patches "
          f"(goal >= 95%); false alarms {det['false_per_1000_clean_frames']:.2f} per 1000 clean frames (goal <= 1); "
          f"pipeline keeps {thr['kept_share']:.1%} of the engine's throughput (goal >= 90%)")
    print(f"wrote {out / 'monitor.json'} and {out / 'detection.png'}")


if __name__ == "__main__":
    main()
