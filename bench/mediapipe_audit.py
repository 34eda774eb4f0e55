"""Google's MediaPipe selfie segmenter, audited end to end (issue 16): imported through tflite2onnx -> onnx2torch and
gated, parity against the original TFLite runtime, a campaign that makes people disappear (16x16 and 32x32
patches), one that paints a person onto background, VGatt on the results, an engine replay, and the monitor
watching a person vanish when the patch appears.

Views (real photographs, offline): the CamVid frames' largest pedestrians, each cropped square around the person
(train and val, largest first), and the VOC fixture photos (no people) for the paint campaign. A view is kept for
the disappear campaign when the imported twin sees a person in it (>= `--min-person` of its pixels).

    python bench/mediapipe_audit.py [--out bench/results/mediapipe] [--people 24] [--steps 100]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() not in (REPO, REPO / "bench")]

PEDESTRIAN = 9  # CamVid's class index of Pedestrian in its annotation PNGs
VIEW_SIZE = (256, 256)  # the selfie model's own input size: no resize inside the twin


def pedestrian_crops(camvid: Path, count: int) -> list[tuple[str, np.ndarray]]:
    """The `count` largest pedestrians of CamVid (train and val), each in a square crop twice its height."""
    people = []
    for split in ("train", "val"):
        for annotation in sorted((camvid / f"{split}annot").glob("*.png")):
            mask = np.asarray(Image.open(annotation)) == PEDESTRIAN
            n, components, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
            for c in range(1, n):
                people.append((int(stats[c, cv2.CC_STAT_AREA]), split, annotation.name, stats[c].tolist()))
    people.sort(key=lambda p: (-p[0], p[1], p[2]))
    crops, seen = [], set()
    for _, split, name, (x, y, w, h, _) in people:
        if (split, name) in seen:  # one person per frame: views of different scenes
            continue
        seen.add((split, name))
        frame = np.asarray(Image.open(camvid / split / name).convert("RGB"))
        side = int(min(max(2 * h, 96), min(frame.shape[:2])))
        cy, cx = y + h // 2, x + w // 2
        top = int(np.clip(cy - side // 2, 0, frame.shape[0] - side))
        left = int(np.clip(cx - side // 2, 0, frame.shape[1] - side))
        crops.append((f"{split}-{Path(name).stem}", frame[top:top + side, left:left + side]))
        if len(crops) == count:
            break
    return crops


def street_views(camvid: Path, count: int) -> list[tuple[str, np.ndarray]]:
    """Square crops (left or right end) of CamVid frames with no pedestrian pixel in them: background to paint a
    person onto."""
    views = []
    for split in ("val", "test", "train"):
        for annotation in sorted((camvid / f"{split}annot").glob("*.png"))[::15]:
            labels = np.asarray(Image.open(annotation))
            side = min(labels.shape)
            for left in (0, labels.shape[1] - side):
                if not (labels[:side, left:left + side] == PEDESTRIAN).any():
                    frame = np.asarray(Image.open(camvid / split / annotation.name).convert("RGB"))
                    views.append((f"street-{split}-{annotation.stem}", frame[:side, left:left + side]))
                    break
            if len(views) == count:
                return views
    return views


def write_views(folder: Path, views: list[tuple[str, np.ndarray]]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, image in views:
        path = folder / f"{name}.png"
        Image.fromarray(cv2.resize(image, VIEW_SIZE[::-1], interpolation=cv2.INTER_AREA)).save(path)
        paths.append(path)
    return paths


def import_selfie(out: Path, gate_images: str) -> Path:
    from export.imports import import_twin_gated
    from segmenters.importing.mediapipe import fetch_selfie_tflite, selfie_spec_path
    from segmenters.importing.tflite import tflite_to_onnx

    tflite = fetch_selfie_tflite(out / "cache")
    onnx_path = tflite_to_onnx(tflite, out / "selfie_segmentation.onnx")
    result = import_twin_gated(onnx_path, selfie_spec_path("general"), out / "selfie.pt", images=gate_images,
                               count=24, progress=True)
    print(result.report.text())
    return out / "selfie.pt"


def person_shares(twin_path: Path, paths: list[Path]) -> dict[Path, float]:
    import torch

    from segmenters.twin import load_twin

    twin = load_twin(twin_path)
    shares = {}
    for path in paths:
        image = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), np.float32) / 255).permute(2, 0, 1)
        shares[path] = float((twin.labels(image[None])[0] == 1).float().mean())
    return shares


def litert_agreement(tflite: Path, twin_path: Path, paths: list[Path]) -> dict:
    """The imported twin's labels against LiteRT running Google's original file, per pixel, on the views."""
    import torch
    from ai_edge_litert.interpreter import Interpreter

    from segmenters.twin import load_twin

    twin, interpreter = load_twin(twin_path), Interpreter(model_path=str(tflite))
    interpreter.allocate_tensors()
    agree = total = 0
    for path in paths:
        x = np.asarray(Image.open(path).convert("RGB"), np.float32)[None] / 255
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
        interpreter.invoke()
        original = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0, :, :, 0] > 0.5
        with torch.no_grad():
            ours = twin.labels(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))[0].numpy() == 1
        agree += int((ours == original).sum())
        total += ours.size
    return {"images": len(paths), "pixels": total, "label_agreement": agree / total}


def paint_masks(folder: Path, twin_path: Path, backgrounds: list[Path]) -> dict[int, str]:
    """A standing person (an ellipse a third of the view high) drawn where the twin sees background."""
    from PIL import ImageDraw

    shares = person_shares(twin_path, backgrounds)
    masks = {}
    for index, path in enumerate(sorted(backgrounds)):
        if shares[path] > 0.01:
            continue
        mask = Image.new("L", VIEW_SIZE[::-1], 255)
        ImageDraw.Draw(mask).ellipse((150, 90, 200, 240), fill=1)
        target = folder / f"{path.stem}-person.png"
        mask.save(target)
        masks[index] = str(target)
    return masks


def campaign_file(path: Path, name: str, twin: Path, engine: Path, images: Path, targets: list, sizes: list[int],
                  steps: int) -> Path:
    path.write_text(yaml.safe_dump({
        "name": name, "models": [str(twin)], "engines": {str(twin): [str(engine)]},
        "images": {"dataset": "folder", "root": str(images), "count": len(list(images.glob("*.png"))),
                   "size": list(VIEW_SIZE)},
        "targets": targets, "patch_sizes": sizes, "seeds": [0],
        "attack": {"steps": steps, "step_size": 4 / 255, "stop_at_success": 0.95}, "eot_eval_draws": 8,
        "device": "cpu"}))
    return path


def run_audit(config: Path, run: Path, vgatt: bool) -> dict:
    from audit.report import write_report
    from audit.runner import run_campaign

    summary = run_campaign(config, run, local_cpus=2, progress=True)
    if vgatt:
        from audit.patch_audit import run_patch_audit

        summary["vgatt"] = run_patch_audit(run, local_cpus=2, device="cpu", progress=True)
    summary["report"] = str(write_report(run))
    return summary


def monitor_run(out: Path, run: Path, engine: Path, onset: int = 15, frames: int = 30) -> dict:
    """The best disappear trial's view as a still camera (a pixel of shake per frame); its patch appears at
    `onset`. `patchwatch monitor` watches the frames with the engine; the first alarm is drawn."""
    from audit.store import trial_metrics, trial_scenes

    metrics = trial_metrics(run)
    best = max(metrics, key=lambda t: (metrics[t].get("success") or 0.0))
    scene = next(s for s in trial_scenes(run) if s.trial == best)
    view = sorted((out / "views" / "people").glob("*.png"))[int(scene.image_index)]
    image = np.asarray(Image.open(view).convert("RGB"))
    top, left = metrics[best]["top"], metrics[best]["left"]
    patch = (np.clip(scene.patch, 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)
    folder = out / "monitor" / "frames"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(frames):
        frame = image.copy()
        if i >= onset:
            frame[top:top + patch.shape[0], left:left + patch.shape[1]] = patch
        frame = np.roll(frame, (i % 3) - 1, axis=1)  # a pixel of camera shake
        Image.fromarray(frame).save(folder / f"{i:04d}.png")
    events = out / "monitor" / "events.jsonl"
    events.unlink(missing_ok=True)
    subprocess.run([sys.executable, "-m", "patchwatch.cli", "monitor", str(folder), "--engine", str(engine),
                    "--policy", "block", "--no-page", "--events", str(events)], check=True, cwd=REPO)
    flips = [e for e in map(json.loads, events.read_text().splitlines()) if e.get("type") == "flip"]
    if flips:
        draw_alarm(folder, flips[0], engine, out / "monitor" / "alarm.png")
    return {"trial": best, "view": view.name, "onset": onset, "frames": frames, "events": str(events),
            "alarm_frames": [e["frame"] for e in flips], "first_alarm": flips[0] if flips else None}


def draw_alarm(folder: Path, alarm: dict, engine_path: Path, picture: Path) -> None:
    """The frame before the alarm and the alarm's frame, each with the engine's labels over it; the alarm's box."""
    from export import load_engine
    from segmenters.visualize import overlay

    engine = load_engine(engine_path, device="cpu")
    panels = []
    for index in (alarm["frame"] - 1, alarm["frame"]):
        frame = np.asarray(Image.open(folder / f"{index:04d}.png").convert("RGB"))
        labels = engine.segment(frame)[0]
        panels.append(np.ascontiguousarray(overlay(frame.transpose(2, 0, 1).astype(np.float32) / 255, labels,
                                                   engine.spec.palette())))
    top, left, bottom, right = alarm["bbox"]
    cv2.rectangle(panels[1], (left, top), (right, bottom), (255, 255, 0), 2)
    Image.fromarray(np.concatenate(panels, axis=1)).save(picture)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "mediapipe"))
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--people", type=int, default=24)
    parser.add_argument("--min-person", type=float, default=0.02)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    out, data, started = Path(args.out), Path(args.data), time.time()
    people = write_views(out / "views" / "candidates", pedestrian_crops(data / "camvid", 3 * args.people))
    voc = [(p.stem, np.asarray(Image.open(p).convert("RGB"))) for p in sorted((data / "fixtures" / "voc").glob("*_image.png"))]
    streets = street_views(data / "camvid", 6)
    backgrounds = write_views(out / "views" / "background",
                              voc + [(f"{n}-flip", im[:, ::-1]) for n, im in voc] + streets)
    twin = import_selfie(out, str(out / "views" / "candidates"))
    shares = person_shares(twin, people)
    kept = [p for p in people if shares[p] >= args.min_person][: args.people]
    folder = out / "views" / "people"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    for path in kept:
        (folder / path.name).write_bytes(path.read_bytes())
    from export.pipeline import ParitySettings, export_onnx_gated
    from segmenters.importing.mediapipe import fetch_selfie_tflite

    engine = out / "selfie_engine.onnx"
    export_onnx_gated(twin, engine, settings=ParitySettings(source=str(folder), count=len(kept)), progress=True)
    result = {"people_views": len(kept), "candidates": len(people),
              "litert": litert_agreement(fetch_selfie_tflite(out / "cache"), twin, sorted(folder.glob("*.png")))}
    disappear = campaign_file(out / "disappear.yaml", "selfie-disappear", twin, engine, folder,
                              [{"kind": "disappear", "remove_class": "person"}], [16, 32], args.steps)
    result["disappear"] = run_audit(disappear, out / "runs" / "disappear", vgatt=True)
    masks = paint_masks(out / "views", twin, backgrounds)
    paint = campaign_file(out / "paint.yaml", "selfie-paint", twin, engine, out / "views" / "background",
                          [{"kind": "mask", "masks": masks}], [32], args.steps)
    result["paint"] = run_audit(paint, out / "runs" / "paint", vgatt=False)
    result["monitor"] = monitor_run(out, out / "runs" / "disappear", engine)
    result["seconds"] = time.time() - started
    (out / "audit.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
