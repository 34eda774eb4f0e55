"""`patchwatch demo`: the whole story on one machine, on the CPU (or its GPU with `--device cuda`), in minutes.

1. train the shapes U-Net twin (reused when OUT/twin/best.pt exists)
2. export it to ONNX behind the parity gate (reused when newer than the twin)
3. serve it with Ray Serve (OIP v2 on 127.0.0.1), on a local Ray cluster whose job agent takes jobs
4. run a small campaign as a Ray job: `ray job submit -- audit campaign campaign.yaml`
5. audit it with VGatt, as a second job: `ray job submit -- audit vgatt RUN`
6. stream a synthetic camera in which the strongest found patch appears on its object, plus a clean camera,
   through the served engine (HTTP), with the flip monitor and its live page; catch the flip
7. write the campaign report and a demo page (each step, its time, the alarm with frames around it)
"""

from __future__ import annotations

import html
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ONSET = 12
FRAMES = 40
CLEAN_SCENE = 7  # a val scene the clean camera circles
DEMO_FPS = 10
WATCH_LIMIT_S = 300  # the monitor step stops here even if a stream has not ended
ALARM_STRIP_FRAMES = 3  # frames shown up to each alarm
ALARM_PICTURE_SIZE = (256, 256)  # the strip's pictures, nearest-neighbour enlarged from the camera's frames
#: on a GPU, the served replica and each campaign trial or audit task take this share of it, so they overlap
GPU_SHARE = 0.25


class Steps:
    """Each step's name, time and outcome, printed as it goes and kept for the page."""

    def __init__(self):
        self.done: list[dict] = []

    def run(self, name: str, function, *args, **kwargs):
        print(f"\n== {name}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        result = function(*args, **kwargs)
        seconds = time.perf_counter() - started
        self.done.append({"step": name, "seconds": round(seconds, 1)})
        print(f"== {name}: {seconds:.1f} s", file=sys.stderr, flush=True)
        return result


def train_twin(out: Path, quick: bool, device) -> dict:
    from segmenters.training import TrainConfig, train

    best = out / "twin" / "best.pt"
    if best.exists() and (out / "twin" / "summary.json").exists():
        summary = json.loads((out / "twin" / "summary.json").read_text())
        return {"reused": str(best), "val_miou": summary["best_val_miou"]}
    # fewer scenes and epochs than the default run (2000 x 14): the demo needs a working twin, not the best one
    config = TrainConfig(out=str(out / "twin"), train_length=300 if quick else 1500, val_length=60 if quick else 200,
                         epochs=2 if quick else 10, eval_every=2 if quick else 10, device=str(device))
    summary = train(config)
    return {"trained": str(best), "val_miou": summary["best_val_miou"], "seconds": summary["train_seconds_this_run"]}


def export_engine(out: Path, device) -> dict:
    from export.pipeline import ParitySettings, export_onnx_gated

    twin, onnx = out / "twin" / "best.pt", out / "unet.onnx"
    if onnx.exists() and onnx.stat().st_mtime > twin.stat().st_mtime:
        return {"reused": str(onnx)}
    reports = export_onnx_gated(twin, onnx, settings=ParitySettings(source="shapes", count=8), device=device)
    report = reports["fp32"]
    return {"engine": str(onnx), "parity": "PASS" if report.passed else "FAIL",
            "label_agreement": report.label_agreement, "max_abs_logit_diff": report.max_abs}


def start_service(out: Path, gpu_share: float):
    """A Ray head with a job agent (campaigns arrive as jobs) and the engine served on it."""
    from serving.cluster import free_port, start_head, start_local
    from serving.config import ServeConfig

    config = ServeConfig(models=[{"name": "shapes", "version": "1", "path": str((out / "unet.onnx").resolve()),
                                  "threads": 1, "max_batch_size": 4, "num_gpus": gpu_share}], port=free_port())
    # campaign trials and VGatt tasks share the 2-core machine with the replica: 4 logical CPUs let them overlap
    head = start_head(num_cpus=4)
    os.environ.update({k: head.env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")})
    try:
        service = start_local(config, address=head.gcs_address)
    except BaseException:
        head.stop()
        raise
    return service, head


def submit_job(head, entrypoint: list[str]) -> str:
    done = head.submit(entrypoint)
    if done.returncode != 0:
        raise RuntimeError(f"ray job submit -- {' '.join(entrypoint)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout


def write_campaign(out: Path, quick: bool) -> Path:
    twin, onnx = (out / "twin" / "best.pt").resolve(), (out / "unet.onnx").resolve()
    path = out / "campaign.yaml"
    path.write_text(yaml.safe_dump({
        "name": "demo",
        "models": [str(twin)], "engines": {str(twin): [str(onnx)]},
        "images": {"dataset": "shapes", "split": "val", "count": 3 if quick else 8, "sample_seed": 0,
                   "objects_per_image": 1, "object_order": "random", "min_object_pixels": 300},
        "targets": [{"kind": "switch"}], "patch_sizes": [8], "seeds": [0],
        "attack": {"steps": 60 if quick else 150, "step_size": 0.0157, "eot_samples": 2},
        "eot_eval_draws": 4, "physical_views": 4,
    }, sort_keys=False))
    return path


def strongest_trial(run: Path) -> tuple[str, dict]:
    """The trial whose patch flips the most pixels as a sticker: physical success times the pixels it changed
    in the image (a patch that switches a tiny object is no demonstration)."""
    from audit.store import trial_metrics

    scored = list(trial_metrics(run).items())
    if not scored:
        raise RuntimeError(f"the campaign stored no trials in {run}")
    key = lambda item: (np.nan_to_num(item[1].get("physical_success_mean", 0.0)) * item[1]["changed"],  # noqa: E731
                        item[1]["success"])
    return max(scored, key=key)


class AlarmStrips:
    """The monitor's `on_frame` hook: for each alarm, the frames before it (camera image and labels) saved as
    pictures, so the page shows the patch arriving and the flip it caused."""

    def __init__(self, folder: Path, palette):
        self.folder, self.palette = folder, palette
        self.recent: dict[str, list] = {}
        self.pictures: list[dict] = []

    def __call__(self, frame, labels, alarms) -> None:
        from segmenters.visualize import overlay

        history = self.recent.setdefault(frame.stream, [])
        history.append((frame.index, overlay(frame.rgb, labels, self.palette), frame.rgb))
        del history[:-ALARM_STRIP_FRAMES]
        for alarm in alarms:
            strip = [self._save(frame.stream, index, painted, rgb) for index, painted, rgb in history]
            self.pictures.append({"alarm": alarm.as_dict(), "strip": strip})

    def _save(self, stream: str, index: int, painted: np.ndarray, rgb: np.ndarray) -> dict:
        from PIL import Image

        name = f"{stream.replace(':', '_').replace('/', '_')}_{index:04d}"
        Image.fromarray(rgb).resize(ALARM_PICTURE_SIZE, Image.NEAREST).save(self.folder / f"{name}.png")
        Image.fromarray(painted).resize(ALARM_PICTURE_SIZE, Image.NEAREST).save(self.folder / f"{name}_labels.png")
        return {"frame": index, "image": f"monitor/{name}.png", "labels": f"monitor/{name}_labels.png"}


def watch(service_url: str, run: Path, trial: str, out: Path) -> dict:
    from monitor.pipeline import JsonLinesSink, Monitor
    from monitor.web import MonitorServer, MonitorView
    from serving.client import RemoteEngine

    engine = RemoteEngine(service_url, "shapes", "1")
    events = out / "monitor" / "events.jsonl"
    if events.exists():
        events.unlink()
    (out / "monitor").mkdir(parents=True, exist_ok=True)
    strips = AlarmStrips(out / "monitor", engine.spec.palette())
    monitor = Monitor(engine, sinks=[JsonLinesSink(events)], on_frame=strips)
    for stream in demo_streams(run, trial):
        monitor.add(stream)
    server = MonitorServer(MonitorView(monitor)).start()
    print(f"live monitor page (while the streams run): {server.url}", file=sys.stderr, flush=True)
    try:
        summary = monitor.run(duration=WATCH_LIMIT_S)
    finally:
        server.stop()
    summary["pictures"] = strips.pictures
    summary["events_file"] = str(events)
    summary["onset"] = ONSET
    return summary


def demo_streams(run: Path, trial: str) -> list:
    """The demo's fleet: a camera drifting past the attacked scene (the patch appears at ONSET), a clean camera,
    and a broken one (a dead camera and a corrupt frame, as the fleet has them: events, not crashes)."""
    from audit.store import trial_scene
    from monitor.cameras import CameraPath, SyntheticCamera, trial_camera
    from monitor.streams import ReplaySource, Stream

    patched = trial_camera(trial_scene(run, trial), onset=ONSET, frames=FRAMES, fps=DEMO_FPS)
    patched.path = CameraPath(sweep_deg=6.0, tilt_deg=2.0, zoom=0.03)  # a slow drift past the attack view
    clean = SyntheticCamera(CLEAN_SCENE, frames=FRAMES, fps=DEMO_FPS, name="camera-2 (clean)")
    broken = ReplaySource([np.zeros((4, 4, 3), np.uint8)], name="camera-3 (broken)")
    return [Stream(patched, name="camera-1 (patch appears)", policy="latest"),
            Stream(clean, name="camera-2 (clean)", policy="latest"),
            Stream(broken, name="camera-3 (broken)")]


def demo_page(out: Path, steps: Steps, facts: dict, report: Path) -> Path:
    rows = "".join(f"<tr><td>{html.escape(s['step'])}</td><td>{s['seconds']}</td></tr>" for s in steps.done)
    watch = facts["monitor"]
    alarms = "".join(
        f"<h3>{html.escape(p['alarm']['stream'])}: {html.escape(p['alarm']['from_name'])} &rarr; "
        f"{html.escape(p['alarm']['to_name'])}, {p['alarm']['pixels']} px, alarm at frame {p['alarm']['frame']} "
        f"(patch appeared at frame {watch['onset'] if 'patch' in p['alarm']['stream'] else '?'})</h3><p>"
        + "".join(f'<figure style="display:inline-block"><img src="{s["image"]}"><img src="{s["labels"]}">'
                  f"<figcaption>frame {s['frame']}</figcaption></figure>" for s in p["strip"]) + "</p>"
        for p in watch["pictures"]) or "<p><b>no alarm was raised</b></p>"
    streams = "".join(f"<tr><td>{html.escape(name)}</td><td>{s['processed']}</td><td>{s['alarms']}</td>"
                      f"<td>{s['fps']:.1f}</td><td>{s['latency_ms_p50']:.0f}</td><td>{s['bad_frames']}</td></tr>"
                      for name, s in watch["streams"].items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>patchwatch demo</title>
<style>body{{font-family:system-ui,sans-serif;margin:1.5em}} td,th{{border:1px solid #ccc;padding:.2em .6em}}
table{{border-collapse:collapse}} img{{width:256px;margin:2px;image-rendering:pixelated}}</style></head><body>
<h1>patchwatch demo</h1>
<p>A shapes U-Net twin, trained here, exported to ONNX behind the parity gate, served with Ray Serve; a patch
campaign and a VGatt audit ran as Ray jobs; a camera in which the strongest patch appears streamed through the
served engine while the flip monitor watched.</p>
<h2>Steps</h2><table><tr><th>step</th><th>seconds</th></tr>{rows}</table>
<h2>Twin and engine</h2><pre>{html.escape(json.dumps({k: facts[k] for k in ("twin", "engine")}, indent=1))}</pre>
<h2>Campaign</h2><p><a href="{os.path.relpath(report, out)}">campaign report</a> (with the VGatt audit) &middot;
strongest patch: trial <code>{html.escape(facts['trial'])}</code></p>
<h2>Monitor</h2><table><tr><th>stream</th><th>frames</th><th>alarms</th><th>fps</th><th>latency p50 (ms)</th>
<th>bad frames</th></tr>{streams}</table>
{alarms}
<p>Every event: <a href="monitor/events.jsonl">monitor/events.jsonl</a></p>
</body></html>"""
    path = out / "index.html"
    path.write_text(page)
    return path


def gpu_options(device) -> list[str]:
    """What a campaign or audit job is told: the CPU, or CUDA with a share of a GPU per task (the one Ray gives)."""
    return ["--device", device.type] + (["--gpus-per-trial", str(GPU_SHARE)] if device.type == "cuda" else [])


def run_demo(out: str | Path = "runs/demo", quick: bool = False, device=None) -> Path:
    """`device`: a resolved `torch.device` (default: the CPU)."""
    import torch

    from audit.report import write_report

    device = device or torch.device("cpu")
    gpu_share = GPU_SHARE if device.type == "cuda" else 0.0
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    steps, facts = Steps(), {}
    facts["twin"] = steps.run("1. train the shapes U-Net twin", train_twin, out, quick, device)
    facts["engine"] = steps.run("2. export to ONNX behind the parity gate", export_engine, out, device)
    service, head = steps.run("3. serve the engine with Ray Serve", start_service, out, gpu_share)
    try:
        campaign = write_campaign(out, quick)
        run = (out / "campaign").resolve()
        steps.run("4. campaign as a Ray job", submit_job, head,
                  ["audit", "campaign", str(campaign.resolve()), "--out", str(run), "--quiet", *gpu_options(device)])
        steps.run("5. VGatt audit as a Ray job", submit_job, head,
                  ["audit", "vgatt", str(run), "--quiet", *gpu_options(device)])
        trial, _ = strongest_trial(run)
        facts["trial"] = trial
        facts["monitor"] = steps.run("6. stream cameras through the served engine, watch for flips", watch,
                                     service.url, run, trial, out)
    finally:
        service.stop()
        head.stop()
    report = steps.run("7. reports", write_report, run)
    (out / "demo.json").write_text(json.dumps({"steps": steps.done, **facts}, indent=1, default=str))
    return demo_page(out, steps, facts, report)
