"""The flip monitor on synthetic streams with known patch onsets, scored on seeds never used to tune it.

Detection: every patch a campaign found on the shapes twin (bench/campaigns/seed000_shapes.yaml) is printed as a
decal on its object in a moving-camera clip of its scene, appearing at a random onset frame. A *seed* draws
each clip's camera path, onset and sensor noise; the campaign's patches are cycled (each round a new view of
each patch) until the seed has `--effective` effective patches: the decal really flips at least `--min-flip`
of its object's pixels outside itself at onset (the same view rendered without it, through the same engine,
says which). A patch that flips less gives the monitor nothing to catch and is reported apart.

Two sets of seeds, never mixed: `--tune-seeds` are the clips thresholds may be chosen on; `--score-seeds`
(default: seeds never used in any choice) are the clips the figures come from. Each is reported per seed and
pooled, the detection rate with its 95 % Wilson interval.

False alarms are counted on clean clips only: per scene, clips of every kind `monitor.cameras.clean_variants`
draws (smooth and fast camera motion, abrupt pans, lighting ramps and flicker, objects entering the view),
and, with `--camvid-engine`, the CamVid val frames in sequence order as a video through a CamVid engine.

`--upscale K` watches every clip as a camera K times larger would deliver it (the detector works at
`FlipConfig.work_width`; the occlusion check's engine agrees with the clip's labels), and every summary reports
the detector's milliseconds per frame: what working at a reduced width costs in detection, and saves in time.

Throughput (the share of the engine's frames/s the monitor keeps) is bench/monitor_throughput.py's.

    python bench/monitor_detection.py [--engine bench/results/shapes/unet.onnx] [--run bench/results/seed000_shapes]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

#: the onset leaves this many frames of history before it, and this many after it to be caught in
ONSET_MARGIN = (8, 10)


@dataclass
class Clip:
    """One rendered clip, segmented once: every detector configuration is judged on the same frames."""

    seed: int
    kind: str  # "patched", or the clean kind ("smooth", "fast", "pan", "lighting", "flicker", "entering", "video")
    scene: int
    trial: str | None
    onset: int | None
    flipped_at_onset: int  # object pixels outside the decal the patch flipped at onset (0 for clean clips)
    frames: np.ndarray  # (T, H, W, 3) uint8
    labels: np.ndarray  # (T, H, W) engine labels
    cuts: tuple[int, ...] = ()  # frames where a new sequence begins (a real video's scene cuts)


# ------------------------------------------------------------------------------------------------ clips
def camera_path(rng: np.random.Generator):
    """A patched clip's smooth camera motion (the clean clips draw theirs in `monitor.cameras.clean_variants`)."""
    from monitor.cameras import CameraPath

    return CameraPath(sweep_deg=float(rng.uniform(6, 18)), tilt_deg=float(rng.uniform(1, 5)),
                      period=int(rng.integers(60, 160)), phase=float(rng.uniform(0, 2 * np.pi)))


def render_frames(camera, frames: int) -> np.ndarray:
    """A camera's first `frames` frames (a worker's job: rendering is the slow part)."""
    camera.open()
    return np.stack([camera.read()[0] for _ in range(frames)])


def render_onset(camera) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The onset view with and without the decal, and the object's pixels outside the decal (a worker's job)."""
    from monitor.streams import to_uint8

    with_patch, without = camera.render(camera.onset, True), camera.render(camera.onset, False)
    region = (with_patch.instances == camera.instance) & ~with_patch.texture_mask
    return to_uint8(with_patch.image), to_uint8(without.image), region


def draw_patched(scenes, rng: np.random.Generator, size, args):
    """Endless patched cameras: the campaign's patches in turn, each time a new path, onset and noise."""
    from monitor.cameras import SyntheticCamera

    for count in range(args.max_clips):
        scene = scenes[count % len(scenes)]
        onset = int(rng.integers(ONSET_MARGIN[0], args.frames - ONSET_MARGIN[1]))
        yield scene, SyntheticCamera(scene.image_index, scene.split, size=size, frames=args.frames,
                                     path=camera_path(rng), patch=scene.patch, instance=scene.object_id, onset=onset,
                                     seed=int(rng.integers(1 << 30)))


def patched_clips(engine, scenes, seed: int, args, pool) -> list[Clip]:
    """Patched clips of `seed` until `args.effective` are effective (or `args.max_clips` were drawn). Only the
    effective ones are rendered whole; the others are kept as their onset figure (reported apart)."""
    size, clips, effective = tuple(engine.spec.input_size), [], 0
    cameras = draw_patched(scenes, np.random.default_rng([seed, 1]), size, args)
    progress = tqdm(total=args.effective, desc=f"seed {seed}: effective patched clips")
    while effective < args.effective and (batch := [c for _, c in zip(range(4 * args.workers), cameras)]):
        onsets = list(pool.map(render_onset, [camera for _, camera in batch]))
        flipped = []
        for (with_patch, without, region) in onsets:
            after, before = engine.segment(np.stack([with_patch, without]))
            flipped.append(int((region & (after != before)).sum()))
        chosen = [camera for (_, camera), n in zip(batch, flipped) if n >= args.min_flip]
        rendered = iter(pool.map(render_frames, chosen, [args.frames] * len(chosen)))
        for (scene, camera), n in zip(batch, flipped):
            images = next(rendered) if n >= args.min_flip else np.zeros((0, *size, 3), np.uint8)
            labels = engine.segment(images) if len(images) else np.zeros((0, *size), np.uint8)
            clips.append(Clip(seed, "patched", scene.image_index, scene.trial, camera.onset, n, images, labels))
        effective += len(chosen)
        progress.update(len(chosen))
    progress.close()
    return clips


def clean_clips(engine, scenes, seed: int, args, pool) -> list[Clip]:
    """Per scene (the first `args.clean_scenes` distinct ones), one clean clip of every kind."""
    from monitor.cameras import clean_variants

    rng = np.random.default_rng([seed, 2])
    size = tuple(engine.spec.input_size)
    distinct = list(dict.fromkeys(scene.image_index for scene in scenes))[:args.clean_scenes]
    jobs = [(index, variant) for index in distinct for variant in clean_variants(rng, args.clean_frames)]
    cameras = [variant.camera(index, scenes[0].split, size=size, frames=args.clean_frames,
                              seed=int(rng.integers(1 << 30))) for index, variant in jobs]
    rendered = pool.map(render_frames, cameras, [args.clean_frames] * len(cameras))
    return [Clip(seed, variant.kind, index, None, None, 0, images, engine.segment(images))
            for (index, variant), images in tqdm(zip(jobs, rendered), total=len(jobs), desc=f"seed {seed}: clean clips")]


def seed_clips(engine, scenes, seed: int, args) -> list[Clip]:
    """A seed's clips, cached under --cache keyed by everything that shapes them."""
    key = hashlib.sha256(json.dumps([engine.spec.checkpoint_digest, [s.trial for s in scenes], seed, args.frames,
                                     args.effective, args.max_clips, args.min_flip, args.clean_scenes,
                                     args.clean_frames, CLIPS_VERSION]).encode()).hexdigest()[:16]
    path = Path(args.cache) / f"clips-seed{seed}-{key}.npz"
    if path.exists():
        return load_clips(path)
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        clips = patched_clips(engine, scenes, seed, args, pool) + clean_clips(engine, scenes, seed, args, pool)
    save_clips(path, clips)
    return clips


CLIPS_VERSION = 1  # bump when the way clips are drawn changes: the cache keys on it


def save_clips(path: Path, clips: list[Clip]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = [{k: getattr(c, k) for k in ("seed", "kind", "scene", "trial", "onset", "flipped_at_onset", "cuts")}
            for c in clips]
    arrays = {f"frames{i}": c.frames for i, c in enumerate(clips)} | {f"labels{i}": c.labels for i, c in enumerate(clips)}
    np.savez(path.with_suffix(".tmp.npz"), meta=json.dumps(meta), **arrays)
    path.with_suffix(".tmp.npz").rename(path)


def load_clips(path: Path) -> list[Clip]:
    with np.load(path) as data:
        meta = json.loads(str(data["meta"]))
        return [Clip(**{**m, "cuts": tuple(m["cuts"])}, frames=data[f"frames{i}"], labels=data[f"labels{i}"])
                for i, m in enumerate(meta)]


def camvid_clip(engine, args) -> Clip:
    """The CamVid val frames in sequence order, as a video, through a CamVid engine: a real clean camera."""
    import cv2
    from camvid_video import (
        camvid_val_video,  # bench/camvid_video.py, beside this script
    )

    height, width = engine.spec.input_size
    video = camvid_val_video(args.camvid_root, Path(args.out) / "camvid_val.mp4", size=(height, width))
    capture, images = cv2.VideoCapture(str(video.path)), []
    while (read := capture.read())[0]:
        images.append(cv2.cvtColor(read[1], cv2.COLOR_BGR2RGB))
    capture.release()
    images = np.stack(images)
    labels = np.concatenate([engine.segment(images[i:i + 8]) for i in range(0, len(images), 8)])
    return Clip(-1, "video", -1, None, None, 0, images, labels, tuple(video.starts))


# ---------------------------------------------------------------------------------------------- scoring
def at_camera_size(relabel, upscale: int):
    """`relabel` as an engine at the enlarged camera's size that agrees with the clip's own labels: each frame
    area-averaged back to the clip's size, segmented there, the labels enlarged (an engine that resized the large
    frame itself would see a resampled patch, which may no longer fool it: that measures the patch, not the
    detector)."""
    import cv2

    def segment(frames: np.ndarray) -> np.ndarray:
        height, width = frames.shape[1] // upscale, frames.shape[2] // upscale
        small = np.stack([cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA) for frame in frames])
        return relabel(small).repeat(upscale, axis=1).repeat(upscale, axis=2)

    return segment


def run_clip(clip: Clip, names, config, relabel=None, upscale: int = 1):
    """The detector over a clip's frames, each `upscale` times its size (a higher-resolution camera: image
    bilinear, labels nearest); also the seconds it spent."""
    import cv2

    from monitor.flips import FlipDetector

    if upscale != 1 and relabel is not None:
        relabel = at_camera_size(relabel, upscale)
    detector = FlipDetector(names, f"scene {clip.scene}", config, relabel=relabel)
    alarms, seconds = [], 0.0
    for index, (rgb, labels) in enumerate(zip(clip.frames, clip.labels)):
        if upscale != 1:
            rgb = cv2.resize(rgb, None, fx=upscale, fy=upscale, interpolation=cv2.INTER_LINEAR)
            labels = cv2.resize(labels, None, fx=upscale, fy=upscale, interpolation=cv2.INTER_NEAREST)
        if index in clip.cuts:
            detector.reset()
        start = time.perf_counter()
        alarms += detector.update(index, rgb, labels)
        seconds += time.perf_counter() - start
    return alarms, detector, seconds


def wilson(hits: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95 % at z = 1.96)."""
    if total == 0:
        return (math.nan, math.nan)
    p = hits / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (centre - half, centre + half)


def judge_clip(clip: Clip, names, config, relabel, min_flip: int, upscale: int = 1) -> dict:
    alarms, detector, seconds = run_clip(clip, names, config, relabel, upscale)
    record = {"seed": clip.seed, "kind": clip.kind, "scene": clip.scene, "frames": len(clip.frames),
              "alarms": len(alarms), "checks": detector.checks, "scored": detector.scored,
              "below_threshold": detector.below_threshold, "detector_s": seconds}
    if clip.kind != "patched":
        record["false"] = [a.frame for a in alarms]
        return record
    after = [a for a in alarms if a.frame >= clip.onset]
    return record | {"trial": clip.trial, "onset": clip.onset, "flipped_at_onset": clip.flipped_at_onset,
                     "effective": clip.flipped_at_onset >= min_flip,
                     "delay": (after[0].frame - clip.onset) if after else None,
                     "false_before_onset": sum(a.frame < clip.onset for a in alarms),
                     "alarm": after[0].as_dict() if after else None}


def summarise(records: list[dict], within: int) -> dict:
    patched = [r for r in records if r["kind"] == "patched"]
    effective = [r for r in patched if r["effective"]]
    caught = [r for r in effective if r["delay"] is not None and r["delay"] <= within]
    delays = [r["delay"] for r in effective if r["delay"] is not None]
    clean = [r for r in records if r["kind"] != "patched"]
    clean_frames = sum(r["frames"] for r in clean)
    false = sum(len(r["false"]) for r in clean)
    low, high = wilson(len(caught), len(effective))
    by_kind = {}
    for kind in sorted({r["kind"] for r in clean}):
        rows = [r for r in clean if r["kind"] == kind]
        frames = sum(r["frames"] for r in rows)
        by_kind[kind] = {"frames": frames, "false": sum(len(r["false"]) for r in rows),
                         "per_1000": 1000.0 * sum(len(r["false"]) for r in rows) / max(frames, 1)}
    return {"patched_clips": len(patched), "effective_patches": len(effective),
            f"detected_within_{within}": len(caught) / max(len(effective), 1), "ci95": [low, high],
            "detected_ever": len(delays) / max(len(effective), 1),
            "delay_median": statistics.median(delays) if delays else None,
            "delay_mean": statistics.mean(delays) if delays else None,
            "false_before_onset": sum(r["false_before_onset"] for r in patched),
            "clean_frames": clean_frames, "false_alarms": false,
            "false_per_1000_clean": 1000.0 * false / max(clean_frames, 1), "false_by_kind": by_kind,
            "engine_checks": sum(r["checks"] for r in records),
            "detector_ms_per_frame": 1000.0 * sum(r["detector_s"] for r in records)
            / max(sum(r["frames"] for r in records), 1)}


def evaluate(clips: list[Clip], names, config, relabel, args) -> dict:
    records = [judge_clip(clip, names, config, relabel, args.min_flip, args.upscale)
               for clip in tqdm(clips, desc="detector over clips", leave=False)]
    seeds = sorted({r["seed"] for r in records})
    return {"per_seed": {seed: summarise([r for r in records if r["seed"] == seed], args.within) for seed in seeds},
            "pooled": summarise(records, args.within), "records": records}


# --------------------------------------------------------------------------------------------- reporting
def plot(result: dict, out: Path, within: int) -> None:
    import matplotlib.pyplot as plt

    records = result["score"]["records"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    delays = [r["delay"] for r in records if r["kind"] == "patched" and r["effective"] and r["delay"] is not None]
    pooled = result["score"]["pooled"]
    axes[0].hist(delays, bins=np.arange(-0.5, max(delays + [within + 1]) + 1.5), color="tab:red", alpha=0.8)
    axes[0].axvline(within + 0.5, color="k", ls="--", lw=1)
    axes[0].set(xlabel="frames from patch onset to alarm", ylabel="clips",
                title=f"scoring seeds: {pooled[f'detected_within_{within}']:.1%} of {pooled['effective_patches']} "
                      f"(95% CI {pooled['ci95'][0]:.1%}-{pooled['ci95'][1]:.1%})")
    patched = [r for r in records if r["kind"] == "patched"]
    caught = np.array([r["delay"] is not None and r["delay"] <= within for r in patched], float)
    axes[1].scatter([max(r["flipped_at_onset"], 0.5) for r in patched],
                    caught + np.random.default_rng(0).uniform(-0.05, 0.05, len(patched)), s=10, alpha=0.6)
    axes[1].axvline(result["min_flip"], color="k", ls="--", lw=1)
    axes[1].set(xscale="log", xlabel="object pixels the patch flipped at onset", yticks=[0, 1],
                yticklabels=["missed", "caught"], title="what is missed")
    kinds = pooled["false_by_kind"]
    if result.get("video"):
        kinds = kinds | {"CamVid video": result["video"]["pooled"]["false_by_kind"]["video"]}
    axes[2].bar(list(kinds), [k["per_1000"] for k in kinds.values()], color="tab:blue")
    axes[2].axhline(0.5, color="k", ls="--", lw=1)
    axes[2].set(ylabel="false alarms / 1000 clean frames", title="false alarms by clean-clip kind")
    axes[2].tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(out / "detection.png", dpi=110)
    plt.close(fig)


def headline(name: str, summary: dict, within: int) -> str:
    low, high = summary["ci95"]
    return (f"{name}: detected within {within} frames {summary[f'detected_within_{within}']:.1%} of "
            f"{summary['effective_patches']} effective patches (95% CI {low:.1%}-{high:.1%}), median delay "
            f"{summary['delay_median']}; false alarms {summary['false_alarms']} in {summary['clean_frames']} clean "
            f"frames = {summary['false_per_1000_clean']:.2f} per 1000; detector {summary['detector_ms_per_frame']:.2f} "
            f"ms/frame")


def print_report(result: dict, within: int) -> None:
    for group in ("tune", "score"):
        if not result.get(group):
            continue
        for seed, summary in result[group]["per_seed"].items():
            print(headline(f"{group} seed {seed}", summary, within))
        print(headline(f"{group} pooled", result[group]["pooled"], within))
    if result.get("upscale", 1) != 1:
        print(f"(every clip watched at {result['upscale']}x its size, the detector at work_width "
              f"{result['config']['work_width']})")
    if result.get("video"):
        video = result["video"]["pooled"]
        print(f"CamVid val video: {video['false_alarms']} false alarms in {video['clean_frames']} frames = "
              f"{video['false_per_1000_clean']:.2f} per 1000")


# -------------------------------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", default="bench/results/shapes/unet.onnx")
    parser.add_argument("--run", default="bench/results/seed000_shapes", help="a campaign run on the shapes twin")
    parser.add_argument("--trials", type=int, help="use only the first N trials of the run (by id)")
    parser.add_argument("--tune-seeds", default="0-5,20-50", help="clips thresholds and the scorers may be chosen "
                        "on, as numbers and ranges ('' for none)")
    # the first scorer was fitted on 0-5 and 20-30, the second look on 0-5 and 20-46; 10-12 and 20-50 were scored by
    # earlier detectors (47-50 scored the trees at threshold 0.22, and so chose 0.31), so the default is 51-54,
    # rendered after that choice
    parser.add_argument("--score-seeds", default="51-54", help="clips the figures come from")
    parser.add_argument("--effective", type=int, default=100, help="effective patches per seed")
    parser.add_argument("--max-clips", type=int, default=400, help="patched clips drawn per seed at most")
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--min-flip", type=int, default=40)
    parser.add_argument("--within", type=int, default=3, help="frames from onset an alarm counts as a detection")
    parser.add_argument("--clean-scenes", type=int, default=10, help="scenes per seed with clean clips of each kind")
    parser.add_argument("--clean-frames", type=int, default=50)
    parser.add_argument("--upscale", type=int, default=1, help="watch every clip at this many times its size (a "
                        "higher-resolution camera; the detector works at FlipConfig.work_width)")
    parser.add_argument("--camvid-engine", help="a CamVid engine: false alarms on the CamVid val video")
    parser.add_argument("--camvid-root", help="CamVid folder (default: the project's data root)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="processes rendering clips")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a FlipConfig field, e.g. --set flow=farneback")
    parser.add_argument("--counterfactual", action=argparse.BooleanOptionalAction, default=True,
                        help="give the detector the engine for its counterfactual and scorer (--no-counterfactual: the "
                             "trigger rule decides)")
    parser.add_argument("--cache", default="bench/results/monitor/clips", help="rendered clips, reused across runs")
    parser.add_argument("--out", default="bench/results/monitor")
    return parser.parse_args()


def seeds(text: str) -> list[int]:
    """Seeds written as "0-5,20,22": numbers and inclusive ranges."""
    numbers = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        first, _, last = part.partition("-")
        try:
            numbers += list(range(int(first), int(last or first) + 1))
        except ValueError:
            raise SystemExit(f"seeds {text!r}: {part!r} is neither a number nor a range like 20-42") from None
    return numbers


def detection_run(engine, scenes, seed_list, config, args) -> dict | None:
    if not seed_list:
        return None
    clips = [clip for seed in seed_list for clip in seed_clips(engine, scenes, seed, args)]
    relabel = engine.segment if args.counterfactual else None
    return evaluate(clips, [c.name for c in engine.spec.classes], config, relabel, args)


def main() -> None:
    args = parse_args()
    import cv2
    import torch

    from audit.store import trial_scenes
    from export import OnnxRuntimeEngine
    from monitor.flips import FlipConfig

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(1)
    engine = OnnxRuntimeEngine(args.engine)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = FlipConfig(**dict(item.split("=", 1) for item in args.set))
    scenes = trial_scenes(args.run, args.trials)
    result = {"config": config.model_dump(), "min_flip": args.min_flip, "upscale": args.upscale,
              "engine": engine.describe(),
              "tune": detection_run(engine, scenes, seeds(args.tune_seeds), config, args),
              "score": detection_run(engine, scenes, seeds(args.score_seeds), config, args), "video": None}
    if args.camvid_engine:
        camvid = OnnxRuntimeEngine(args.camvid_engine)
        result["video"] = evaluate([camvid_clip(camvid, args)], [c.name for c in camvid.spec.classes], config,
                                   camvid.segment if args.counterfactual else None, args)
    (out / "monitor.json").write_text(json.dumps(result, indent=1, default=str))
    print_report(result, args.within)
    if result["score"]:
        plot(result, out, args.within)
        print(f"wrote {out / 'detection.png'}")
    print(f"wrote {out / 'monitor.json'}")


if __name__ == "__main__":
    main()
