"""Seed 001 on CamVid (issue 18, item 3): the ladder DenseNet-121 beside LR-ASPP and DeepLabV3-ResNet-18.

Each `--archs` model is trained with PPCE on the same budget (size, epochs, max steps, batch, learning rate and
poly schedule, seed), each run in its own folder under `--runs`, skipped when finished (or recorded under `--records`
by another machine) and continued when partly done (bench/camvid_runs.py: `--only`, `--max-runs`, `--stop-after`,
`--list`, `--report-only`). Then, like seed 001's accuracy/speed comparison: val mIoU of the final weights
(last.pt), and frames/s of each model at `--fps-size` (CamVid's 360x480; a run recorded elsewhere is timed with
its arch's seeded initial weights, the same computation) through the project's engines: `Engine.segment` on uint8
CamVid val frames, batch `--fps-batch`, `--fps-warmup` untimed calls, then the median of `--fps-calls` timed ones
(labels back on the host, so every call has finished). Engines (`--engines`): `torch` (the eager twin, fp32 with
TF32 off on CUDA), `torch-fp16` (autocast, CUDA only), `onnxruntime` (export.export_onnx, ONNX Runtime on
`--device`) and `onnxruntime-cpu`.

Writes comparison.json, accuracy_fps.png (mIoU against frames/s), curves.png (val mIoU and training PPCE against
epoch) and index.html under `--out`. The defaults are bench/camvid_semeda.py --plan fair's budget, so the
LR-ASPP run here is that plan's lraspp_mobilenetv3_ppce_s0 (the same folder and record, not trained twice).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import matplotlib
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python bench/camvid_archs.py`: make `bench.camvid_runs` importable
    sys.path.insert(0, str(REPO))

from bench.camvid_runs import (  # noqa: E402
    FAIR_CROP, FAIR_EPOCHS, FAIR_EVAL_EVERY, FAIR_RECORDS, FAIR_RUNS, FAIR_SIZE, PlannedRun, RunFolders, RunMismatch,
    add_budget_arguments, collect, html_table, mean_std, parse_size, percent, plot_curves,
    plus_minus, run_styles, table_keys, train_plan, train_time, trained_on, write_page, yes_no,
)
from export import EngineError, OnnxRuntimeEngine, TorchEngine, export_onnx, model_metadata  # noqa: E402
from export.engine import Engine  # noqa: E402
from segmenters.data import build_dataset, dataset_classes  # noqa: E402
from segmenters.models import build_model  # noqa: E402
from segmenters.spec import ModelSpec, Normalization  # noqa: E402
from segmenters.twin import Twin, load_twin  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

#: seed 001's ladder DenseNet and the two zoo models seed 000 / issue 18 compare it with
ARCHS = "ladder_densenet121,lraspp_mobilenetv3,deeplabv3_resnet18"
ENGINES = ("torch", "torch-fp16", "onnxruntime", "onnxruntime-cpu")
#: the scatter's marker per engine
ENGINE_MARKERS = {"torch": "o", "torch-fp16": "s", "onnxruntime": "^", "onnxruntime-cpu": "v"}


class EngineUnavailable(RuntimeError):
    """An engine this machine cannot run (fp16 autocast without CUDA, no CUDA provider for ONNX Runtime)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default=ARCHS)
    parser.add_argument("--seeds", default="0", help="comma-separated; mIoU is the mean over them")
    parser.add_argument("--out", default="bench/results/camvid_archs")
    parser.add_argument("--engines", default="torch,torch-fp16,onnxruntime", help=f"any of {', '.join(ENGINES)}")
    parser.add_argument("--fps-size", default="360x480", help="HEIGHTxWIDTH of the timed frames")
    parser.add_argument("--fps-batch", type=int, default=1, help="frames per timed call")
    parser.add_argument("--fps-warmup", type=int, default=3, help="untimed calls first (allocation, autotuning)")
    parser.add_argument("--fps-calls", type=int, default=20, help="timed calls; frames/s from their median")
    add_budget_arguments(parser, size=FAIR_SIZE, crop=FAIR_CROP, epochs=FAIR_EPOCHS, eval_every=FAIR_EVAL_EVERY,
                         runs=FAIR_RUNS, records=FAIR_RECORDS)
    args = parser.parse_args(argv)
    unknown = set(args.engines.split(",")) - set(ENGINES)
    if unknown:
        parser.error(f"unknown engines {sorted(unknown)}; expected some of {ENGINES}")
    return args


def build_plan(args: argparse.Namespace) -> list[PlannedRun]:
    seeds = [int(v) for v in args.seeds.split(",")]
    return [PlannedRun(f"{arch}_ppce_s{seed}", arch, "ppce", None, seed, arch)
            for seed in seeds for arch in args.archs.split(",")]


# ------------------------------------------------------------------------------------------------ frames/s
def timed_twin(arch: str, folder: Path, device: torch.device, size: tuple[int, int]) -> Twin:
    """The run's final weights when they are on this machine; else (a run recorded elsewhere) the arch with seeded
    initial weights: the same computation, so the same frames/s."""
    if (folder / "last.pt").is_file():
        return load_twin(folder / "last.pt", map_location=device)
    torch.manual_seed(0)
    classes = dataset_classes("camvid")
    spec = ModelSpec(arch=arch, classes=classes, normalization=Normalization(), input_size=size, dataset="camvid")
    return Twin(build_model(arch, len(classes)).eval().to(device), spec)


def build_engine(kind: str, arch: str, folder: Path, device: torch.device, fps_size: tuple[int, int],
                 threads: int | None) -> Engine:
    """The run's twin (timed_twin) behind `kind`; the ONNX file (folder/model.onnx) is exported again only when its
    spec's weight digest is not the twin's."""
    twin = timed_twin(arch, folder, device, fps_size)
    if kind == "torch":
        return TorchEngine(twin, device, "fp32")
    if kind == "torch-fp16":
        if device.type != "cuda":
            raise EngineUnavailable("fp16 autocast is timed on CUDA only")
        return TorchEngine(twin, device, "fp16")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    if not path.is_file() or model_metadata(path)[0].checkpoint_digest != twin.spec.checkpoint_digest:
        export_onnx(twin, path, sample_size=fps_size)
    where = "cpu" if kind == "onnxruntime-cpu" else str(device)
    try:
        return OnnxRuntimeEngine(path, device=where, threads=threads)
    except EngineError as exc:
        raise EngineUnavailable(str(exc)) from exc


def val_frames(args: argparse.Namespace, size: tuple[int, int]) -> np.ndarray:
    """The first --fps-batch CamVid val images at `size` as uint8 (N, H, W, 3) frames, what a camera hands over."""
    val = build_dataset("camvid", "val", root=args.data_root, size=size)
    images = torch.stack([val[i][0] for i in range(args.fps_batch)])
    return (images.permute(0, 2, 3, 1) * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def frames_per_second(engine: Engine, frames: np.ndarray, warmup: int, calls: int) -> dict:
    """`warmup` untimed segment() calls, then `calls` timed ones: frames/s from the median call."""
    for _ in range(warmup):
        engine.segment(frames)
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        engine.segment(frames)
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    return {"fps": len(frames) / median, "median_ms": 1000 * median, "min_ms": 1000 * min(seconds),
            "max_ms": 1000 * max(seconds), "calls": calls, "batch": len(frames), **engine.describe()}


def measure_speed(args: argparse.Namespace, folders: dict[str, Path], device: torch.device) -> dict[str, dict]:
    """Per arch (its run's folder under --runs), per engine: frames/s (or why the engine was not timed)."""
    size = parse_size(args.fps_size)
    frames = val_frames(args, size)
    speed: dict[str, dict] = {}
    for arch, folder in folders.items():
        speed[arch] = {}
        for kind in args.engines.split(","):
            try:
                engine = build_engine(kind, arch, folder, device, size, args.threads)
                speed[arch][kind] = frames_per_second(engine, frames, args.fps_warmup, args.fps_calls)
                print(f"{arch:22s} {kind:16s} {speed[arch][kind]['fps']:9.1f} frames/s "
                      f"({speed[arch][kind]['median_ms']:.1f} ms median, {engine.backend})", flush=True)
            except EngineUnavailable as exc:
                speed[arch][kind] = {"unavailable": str(exc)}
                print(f"{arch:22s} {kind:16s} not timed: {exc}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return speed


# ------------------------------------------------------------------------------------------------ report
def arch_table(results: dict[str, dict], speed: dict[str, dict], args: argparse.Namespace) -> dict[str, dict]:
    """Per arch: parameters, frames/s and, over its finished runs' seeds, mean +- std of every summary metric (no
    figure before one is finished: a mean of no value is None)."""
    table = {}
    classes = len(dataset_classes("camvid"))
    for arch in args.archs.split(","):
        entries = [e for e in results.values() if e["run"].arch == arch and "metrics" in e]
        keys = entries[0]["metrics"] if entries else table_keys()
        table[arch] = {"parameters": sum(p.numel() for p in build_model(arch, classes).parameters()),
                       "seeds": [e["run"].seed for e in entries],
                       **{k: mean_std([e["metrics"][k] for e in entries]) for k in keys},
                       "speed": speed.get(arch, {})}
    return table


def plot_accuracy_fps(table: dict[str, dict], path: Path, fps_size: str) -> None:
    """Seed 001-style accuracy/speed: val mIoU (+- std over seeds) against frames/s, a colour per arch and a marker
    per engine; each arch named once, at its fastest engine."""
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for index, (arch, row) in enumerate(table.items()):
        timed = {kind: figures["fps"] for kind, figures in row["speed"].items() if "fps" in figures}
        if row["miou"]["mean"] is None:  # not trained yet: no point to place
            continue
        miou, spread = 100 * row["miou"]["mean"], 100 * (row["miou"]["std"] or 0.0)
        for kind, fps in timed.items():
            ax.errorbar(fps, miou, yerr=spread or None, color=f"C{index}", marker=ENGINE_MARKERS[kind],
                        markersize=8, capsize=3, linestyle="none", label=f"{arch} ({kind})")
        if timed:
            ax.annotate(arch, (max(timed.values()), miou), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set(xscale="log", xlabel=f"frames/s at {fps_size} (Engine.segment, median call)",
           ylabel="CamVid val mIoU (%)", title="accuracy vs speed (PPCE, same budget)")
    ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(table: dict[str, dict], engines: list[str]) -> None:
    print(f"\n{'arch':22s}{'params (M)':>11s}{'mIoU':>16s}" + "".join(f"{k + ' fps':>20s}" for k in engines))
    for arch, row in table.items():
        fps = [f"{row['speed'][k]['fps']:.1f}" if "fps" in row["speed"].get(k, {}) else "n/a" for k in engines]
        print(f"{arch:22s}{row['parameters'] / 1e6:11.2f}{plus_minus(row['miou']):>16s}"
              + "".join(f"{f:>20s}" for f in fps))


def write_outputs(args, results: dict[str, dict], table: dict[str, dict], out: Path) -> None:
    engines = args.engines.split(",")
    budget = {k: getattr(args, k) for k in ("size", "crop", "epochs", "max_steps", "batch_size", "lr", "eval_every",
                                            "val_limit", "amp", "fps_size", "fps_batch", "fps_warmup", "fps_calls")}
    runs = {name: {"arch": e["run"].arch, "seed": e["run"].seed, "state": e["state"], "metrics": e.get("metrics"),
                   "convergence": e["convergence"], "pieces": e["pieces"]} for name, e in results.items()}
    (out / "comparison.json").write_text(json.dumps({"budget": budget, "archs": table, "runs": runs}, indent=2))
    devices = trained_on(results)
    keys = table_keys()
    parts = [f"<p>PPCE, {args.size} (training crops {args.crop or args.size}), {args.epochs} epochs (max steps "
             f"{args.max_steps}), batch {args.batch_size}, lr {args.lr} (AdamW, poly), seeds {args.seeds}; trained "
             f"on: {', '.join(devices) or 'n/a'}. mIoU: final "
             f"weights on CamVid val, %. Frames/s: Engine.segment on {args.fps_batch} uint8 frame(s) of "
             f"{args.fps_size}, median of {args.fps_calls} calls after {args.fps_warmup} warm-up calls.</p>",
             html_table(["arch", "params (M)", *keys, *(f"{k} fps" for k in engines)],
                        [[arch, f"{row['parameters'] / 1e6:.2f}", *(plus_minus(row[k]) for k in keys),
                          *(f"{row['speed'][k]['fps']:.1f}" if "fps" in row["speed"].get(k, {}) else
                            row["speed"].get(k, {}).get("unavailable", "n/a") for k in engines)]
                         for arch, row in table.items()]),
             "<img src='accuracy_fps.png'>",
             html_table(["run", "state", "trained on", "val mIoU gain, last quarter", "converged", "train s"],
                        [[n, e["state"], ", ".join(trained_on({n: e})), percent(e["convergence"]["tail_gain"]),
                          yes_no(e["convergence"]["converged"]), train_time(e)] for n, e in results.items()]),
             "<h2>Convergence</h2><img src='curves.png'>"]
    write_page(out / "index.html", "CamVid: ladder DenseNet vs LR-ASPP vs DeepLabV3-R18", parts)
    print(f"wrote {out / 'comparison.json'}, {out / 'index.html'}, accuracy_fps.png and curves.png")


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # the report's folder; the runs live under --runs
    folders = RunFolders(args)
    expand = partial(build_plan, args)
    started = train_plan(expand, args, folders)
    if started is None:
        return
    plan, device = started
    results = collect(plan, args, folders, device)
    # every arch is timed, trained or not: frames/s are the arch's, whatever its weights (timed_twin)
    timed = {run.arch: folders.folder(run) for run in plan if run.seed == plan[0].seed}
    table = arch_table(results, measure_speed(args, timed, device), args)
    print_table(table, args.engines.split(","))
    plot_curves({n: e["history"] for n, e in results.items()}, run_styles([e["run"] for e in results.values()]),
                out / "curves.png")
    plot_accuracy_fps(table, out / "accuracy_fps.png", args.fps_size)
    write_outputs(args, results, table, out)


def main() -> None:
    try:
        run(parse_args())
    except RunMismatch as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
