"""Shared by bench/camvid_semeda.py and bench/camvid_archs.py: a plan of CamVid training runs, each in its own folder
under `--runs`, skipped when finished and continued (`train(..., resume=True)`) when partly done, so that a long
budget can be spent in pieces; the final evaluation of each run (cached by checkpoint digest), per-image mIoU,
paired tests, convergence curves and a static index.html.

A run is finished when its `history.json` (written by `train()` after every epoch, after `last.pt`) reaches the
planned epochs or `max_steps`. A folder trained with other settings (loss, lambdas, seed, size, schedule...) is
refused rather than continued.

A finished run, once evaluated, leaves a record under `--records` (RECORD_FILES: its config, history, pieces and
final evaluation; no weights), which is committed. The project's machines keep nothing between sessions for sure,
and a run takes most of one, so a plan adds up run by run in git: a recorded run is not trained again (state
"recorded"), and the reports read it from its record wherever its weights are gone."""

from __future__ import annotations

import argparse
import html
import json
import math
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import scipy.stats
import torch

from segmenters.data import build_dataset
from segmenters.data.loading import device_batches
from segmenters.device import DEVICE_HELP, describe_device, resolve_device
from segmenters.evaluate import evaluate
from segmenters.metrics import confusion_matrix, iou_from_confusion, nanmean
from segmenters.training import TrainConfig, train
from segmenters.twin import Twin, load_twin

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

#: what a run's folder must agree on to be continued; the budget's length (epochs, max_steps, eval_every) may grow,
#: and where and how it runs (device, amp, threads, workers, compile, val_limit) may change between pieces
RUN_IDENTITY = ("arch", "dataset", "loss", "lambdas", "size", "crop", "scale_range", "batch_size", "lr",
                "weight_decay", "poly_power", "seed", "semeda_pretrain_batches", "bn_recalibration_batches")
#: the budget bench/camvid_semeda.py --plan fair and bench/camvid_archs.py share (issue 18, items 2 and 3), sized for
#: this project's 2-core CPU machines: CamVid's full 360x480 frames, trained on random 180x240 crops of the randomly
#: scaled frame (a quarter of its pixels a step), validated on whole frames; 200 epochs (9000 steps at batch 8). A
#: 60-epoch run on 240x320 crops was still gaining 1.4 points of val mIoU every 6 epochs at epoch 48 (from scratch:
#: no pretrained weights here), so the budget buys steps with smaller crops; an LR-ASPP run fits one session (~1.1 h)
FAIR_SIZE, FAIR_CROP, FAIR_EPOCHS, FAIR_EVAL_EVERY = "360x480", "180x240", 200, 10
FAIR_RUNS = "bench/results/camvid_runs"
#: committed records of the finished runs of the fair budget (bench/records/README.md)
FAIR_RECORDS = "bench/records/camvid_runs"
#: what a run's record holds: enough for every report figure, curve and paired test; never weights
RECORD_FILES = ("config.yaml", "history.json", "pieces.jsonl", "final_eval.json")
#: overlay panels the final evaluation writes per run (eval/overlays/)
EVAL_OVERLAYS = 4
#: trimap band width (px) the summary tables show; every band is in comparison.json and trimap.png
TABLE_BAND = 5
#: the sign-flip test enumerates every sign pattern while there are at most this many, and draws this many beyond
SIGN_FLIP_RESAMPLES = 100_000
#: convergence: the val mIoU gain over the last CONVERGENCE_TAIL of the epochs; below CONVERGED_GAIN = converged
CONVERGENCE_TAIL = 0.25
CONVERGED_GAIN = 0.01


#: --compile's choices and the TrainConfig.compile each stands for
COMPILE_CHOICES = {"auto": "auto", "on": True, "off": False}


class RunMismatch(RuntimeError):
    """A run folder holds a run trained with other settings than the plan asks of it."""


@dataclass(frozen=True)
class PlannedRun:
    """One training run of a plan: its folder name under --out and what sets it apart from the others."""

    name: str
    arch: str
    loss: str = "ppce"
    lambdas: tuple[float, ...] | None = None
    seed: int = 0
    group: str = ""  # what the report pools it with: "ppce", "semeda 4,2,0", "sobel 4", an arch name


# ------------------------------------------------------------------------------------------------ arguments
def add_budget_arguments(parser: argparse.ArgumentParser, *, size: str | None, crop: str | None, epochs: int | None,
                         eval_every: int | None, runs: str | None, records: str | None) -> None:
    """The budget every run of a plan shares, where its runs and their records live, and how the plan is run
    (slices, device, precision, threads)."""
    parser.add_argument("--runs", default=runs, help="folder of the run folders; bench/camvid_semeda.py --plan fair "
                                                     "and bench/camvid_archs.py share it, so a run both plan (the "
                                                     "same arch, loss, seed and budget) is trained once")
    parser.add_argument("--records", default=records,
                        help="folder of the finished runs' records (config, history, pieces, final evaluation; no "
                             "weights), committed so that a plan spent over several machines adds up; a recorded "
                             "run is not trained again. 'none': keep no records")
    parser.add_argument("--size", default=size, help="HEIGHTxWIDTH (CamVid is 360x480)")
    parser.add_argument("--crop", default=crop, help="HEIGHTxWIDTH training crop of the randomly scaled image "
                                                     "(default: --size); validation sees the whole --size image")
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--max-steps", type=int, default=None, help="bound on each run's optimiser steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, default=eval_every, help="validate every this many epochs")
    parser.add_argument("--semeda-pretrain-batches", type=int, default=TrainConfig().semeda_pretrain_batches)
    parser.add_argument("--val-limit", type=int, default=None, help="evaluate on at most this many val images")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--amp", default="auto", help="training precision, as TrainConfig.amp: auto (CUDA: bf16 or "
                                                      "fp16; CPU: off), bf16, fp16 or off. On a CPU with AMX, bf16 "
                                                      "trains DeepLabV3-R18 2.9x and the ladder DenseNet 2x faster")
    parser.add_argument("--compile", choices=sorted(COMPILE_CHOICES), default="auto",
                        help="torch.compile the training step, as TrainConfig.compile: auto (CUDA: the model; a SEMEDA "
                             "loss everywhere), on or off")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: train()'s)")
    parser.add_argument("--only", default=None, help="comma-separated run names: train only these")
    parser.add_argument("--max-runs", type=int, default=None, help="train (or continue) at most this many runs")
    parser.add_argument("--stop-after", type=float, default=None,
                        help="minutes: start no further run after this long (a run in progress is not cut)")
    parser.add_argument("--report-only", action="store_true", help="train nothing; report what is finished")
    parser.add_argument("--train-only", action="store_true",
                        help="train and stop: no final evaluation, record or report (for trainers side by side, as "
                             "bench/gpu_fair.py runs them; a later --report-only evaluates and records)")
    parser.add_argument("--list", action="store_true", help="print the plan with each run's state and exit")
    parser.add_argument("--fresh", action="store_true",
                        help="retrain the selected unfinished runs from scratch; with --only, a run recorded "
                             "elsewhere is trained again too, for its weights (its record is then rewritten)")
    parser.add_argument("--resume", action="store_true",
                        help="accepted for old command lines: partly done runs are always continued")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def parse_size(text: str) -> tuple[int, int]:
    height, width = (int(v) for v in text.lower().split("x"))
    return height, width


def train_config(run: PlannedRun, args: argparse.Namespace) -> TrainConfig:
    """The run's TrainConfig: the plan's budget, the run's arch, loss, lambdas and seed; its folder under --runs."""
    return TrainConfig(
        arch=run.arch, dataset="camvid", data_root=args.data_root, loss=run.loss, lambdas=run.lambdas,
        size=parse_size(args.size), crop=parse_size(args.crop) if args.crop else None, epochs=args.epochs,
        max_steps=args.max_steps, batch_size=args.batch_size,
        lr=args.lr, seed=run.seed, semeda_pretrain_batches=args.semeda_pretrain_batches, val_limit=args.val_limit,
        eval_every=args.eval_every, threads=args.threads, device=args.device, amp=args.amp, workers=args.workers,
        compile=COMPILE_CHOICES[args.compile],
        out=str(Path(args.runs) / run.name),
    )


# ------------------------------------------------------------------------------------------------ running
def read_history(folder: Path) -> list[dict]:
    path = folder / "history.json"
    return json.loads(path.read_text()) if path.is_file() else []


def finished(history: list[dict], config: TrainConfig) -> bool:
    """Whether the run has spent its budget: the planned epochs, or max_steps (SEMEDA pretraining included)."""
    if not history:
        return False
    last = history[-1]
    steps_done = config.max_steps is not None and last["step"] >= config.max_steps - config.pretrain_steps()
    return last["epoch"] >= config.epochs or steps_done


def check_identity(folder: Path, config: TrainConfig) -> None:
    """RunMismatch unless the run (or record) in `folder` was trained with the plan's RUN_IDENTITY settings."""
    saved = TrainConfig.from_yaml(folder / "config.yaml")
    differing = [f"{key}={getattr(saved, key)!r} (plan: {getattr(config, key)!r})"
                 for key in RUN_IDENTITY if getattr(saved, key) != getattr(config, key)]
    if differing:
        raise RunMismatch(f"{folder} holds another run: {', '.join(differing)}; give another --runs / --records "
                          f"or remove it")


@dataclass(frozen=True)
class RunFolders:
    """Where a plan's runs are: `--runs/<name>` (checkpoints, on the machine that trained them) and, once finished
    and evaluated, `--records/<name>` (RECORD_FILES, committed)."""

    args: argparse.Namespace

    def config(self, run: PlannedRun) -> TrainConfig:
        return train_config(run, self.args)

    def folder(self, run: PlannedRun) -> Path:
        return Path(self.args.runs) / run.name

    def record(self, run: PlannedRun) -> Path | None:
        records = self.args.records
        return None if records in (None, "", "none") else Path(records) / run.name

    def state(self, run: PlannedRun) -> str:
        """"new", "partial" (continue it), "done" (finished, weights here) or "recorded" (finished, its record only:
        trained on another machine); RunMismatch for a folder or record of another run."""
        config, folder = self.config(run), self.folder(run)
        if (folder / "last.pt").is_file():
            check_identity(folder, config)
            return "done" if finished(read_history(folder), config) else "partial"
        record = self.record(run)
        if record is not None and all((record / name).is_file() for name in RECORD_FILES):
            check_identity(record, config)
            if finished(read_history(record), config):
                return "recorded"
        return "new"

    def source(self, run: PlannedRun) -> Path:
        """The folder to read the run's history, pieces and final evaluation from: its weights' folder when they are
        here, else its record."""
        folder, record = self.folder(run), self.record(run)
        return record if record is not None and not (folder / "last.pt").is_file() else folder

    def history(self, run: PlannedRun) -> list[dict]:
        return read_history(self.source(run))

    def pieces(self, run: PlannedRun) -> list[dict]:
        path = self.source(run) / "pieces.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []

    def write_record(self, run: PlannedRun) -> None:
        """Copy the finished, evaluated run's RECORD_FILES to its record (none when --records is 'none')."""
        record = self.record(run)
        if record is None:
            return
        record.mkdir(parents=True, exist_ok=True)
        for name in RECORD_FILES:
            shutil.copyfile(self.folder(run) / name, record / name)


def print_plan(plan: Iterable[PlannedRun], folders: RunFolders) -> None:
    for run in plan:
        config = folders.config(run)
        history = folders.history(run)
        where = f"epoch {history[-1]['epoch']}/{config.epochs}" if history else ""
        print(f"{run.name:40s} {folders.state(run):9s} {where}")


def execute(expand: Callable[[], list[PlannedRun]], args: argparse.Namespace, folders: RunFolders) -> None:
    """Train the plan's unfinished runs in order (within --only, --max-runs, --stop-after); skip finished and
    recorded ones.

    The plan is expanded again after every run: a run that depends on others (SEMEDA's best lambda on more seeds)
    joins it once they are finished, and is trained in the same invocation."""
    only = set(args.only.split(",")) if args.only else None
    started, trained, seen = time.monotonic(), 0, set()
    while True:
        run = next((r for r in expand() if r.name not in seen and (only is None or r.name in only)), None)
        if run is None:
            missing = (only or set()) - seen
            if missing:
                print(f"--only: not in the plan (yet): {sorted(missing)}")
            return
        seen.add(run.name)
        state = folders.state(run)
        retrain = state == "recorded" and args.fresh and only is not None  # its weights wanted here again
        if state == "done" or (state == "recorded" and not retrain):
            print(f"{run.name}: {'finished' if state == 'done' else 'recorded (trained elsewhere)'}, skipped")
            continue
        if args.max_runs is not None and trained >= args.max_runs:
            print(f"stopping before {run.name}: --max-runs {args.max_runs} reached")
            return
        if args.stop_after is not None and time.monotonic() - started > 60 * args.stop_after:
            print(f"stopping before {run.name}: --stop-after {args.stop_after} min reached")
            return
        config = folders.config(run)
        resume = state == "partial" and not args.fresh
        print(f"{run.name}: {'continuing' if resume else 'training'} ({config.loss}, lambdas {config.lambdas}, "
              f"seed {config.seed}, {config.arch} at {config.size[0]}x{config.size[1]})", flush=True)
        _log_piece(Path(config.out), train(config, resume=resume, progress=not args.quiet))
        torch._dynamo.reset()  # the next run compiles its own model afresh, not against this one's cached graphs
        trained += 1


def _log_piece(folder: Path, summary: dict) -> None:
    """One line per train() call of the run in pieces.jsonl: how and where its budget was spent."""
    keys = ("steps", "epochs", "final_val_miou", "train_seconds_this_run", "device", "amp", "compiled", "workers")
    with (folder / "pieces.jsonl").open("a") as file:
        file.write(json.dumps({"at": time.strftime("%Y-%m-%d %H:%M:%S"), **{k: summary.get(k) for k in keys}}) + "\n")


# ------------------------------------------------------------------------------------------------ evaluation
def val_dataset(args: argparse.Namespace) -> torch.utils.data.Dataset:
    return build_dataset("camvid", "val", root=args.data_root, size=parse_size(args.size), cache=True)


@torch.no_grad()
def per_image_miou(twin: Twin, dataset, batch_size: int, limit: int | None) -> list[float | None]:
    """mIoU of each image on its own (classes in its ground truth or prediction), in dataset order; None for an
    image without a labelled pixel."""
    twin.model.eval()
    device = next(twin.model.parameters()).device
    count = len(dataset) if limit is None else min(limit, len(dataset))
    scores: list[float | None] = []
    for images, labels in device_batches(torch.utils.data.Subset(dataset, range(count)), batch_size, device):
        predictions = twin.labels(images.to(device)).cpu()
        for prediction, target in zip(predictions, labels):
            cm = confusion_matrix(prediction, target, twin.spec.num_classes, twin.spec.ignore_index)
            value = nanmean(iou_from_confusion(cm))
            scores.append(None if math.isnan(value) else value)
    return scores


def final_evaluation(folder: Path, val, device: torch.device, batch_size: int, limit: int | None) -> dict:
    """The run's final weights (last.pt: the same budget for every run, not the best on val) on val: evaluate()'s
    report (eval/ holds its plots and overlays) and per-image mIoU; cached in final_eval.json by weight digest."""
    twin = load_twin(folder / "last.pt", map_location=device)
    key = {"digest": twin.spec.checkpoint_digest, "images": evaluated_images(val, limit),
           "size": list(twin.spec.input_size)}
    cache = folder / "final_eval.json"
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached
    report = evaluate(twin, val, batch_size=batch_size, out_dir=folder / "eval", overlays=EVAL_OVERLAYS,
                      limit=limit, progress=False)
    result = {"key": key, "report": report, "per_image_miou": per_image_miou(twin, val, batch_size, limit)}
    cache.write_text(json.dumps(result))
    return result


def evaluated_images(val, limit: int | None) -> int:
    return len(val) if limit is None else min(limit, len(val))


def recorded_evaluation(record: Path, val, limit: int | None) -> dict | None:
    """A recorded run's final evaluation, or None (said) when it was made on another number of val images."""
    recorded = json.loads((record / "final_eval.json").read_text())
    if recorded["key"]["images"] != evaluated_images(val, limit):
        print(f"{record}: evaluated on {recorded['key']['images']} val images, this report on "
              f"{evaluated_images(val, limit)}; its weights are not here to evaluate again: left out of the figures")
        return None
    return recorded


def collect(plan: list[PlannedRun], args: argparse.Namespace, folders: RunFolders,
            device: torch.device) -> dict[str, dict]:
    """Per run begun: its history, convergence, pieces and folder; for a finished run also the final evaluation
    (`report`, its `metrics` and the `per_image` mIoU). A finished run with weights here is evaluated
    (cached) and recorded; a recorded one is read from its record."""
    val = val_dataset(args)
    results = {}
    for run in plan:
        state = folders.state(run)
        if state == "new":
            continue
        history = folders.history(run)
        entry = {"run": run, "state": state, "history": history, "convergence": convergence(history),
                 "pieces": folders.pieces(run), "folder": folders.source(run)}
        evaluation = None
        if state == "done":
            evaluation = final_evaluation(folders.folder(run), val, device, args.batch_size, args.val_limit)
            folders.write_record(run)
        elif state == "recorded":
            evaluation = recorded_evaluation(folders.record(run), val, args.val_limit)
        if evaluation is not None:
            entry.update(report=evaluation["report"], metrics=summary_metrics(evaluation["report"]),
                         per_image=evaluation["per_image_miou"])
        results[run.name] = entry
    return results


def summary_metrics(report: dict) -> dict[str, float | None]:
    """mIoU, trimap boundary / non-boundary mIoU at every band, mean F1, mean E-measure, pixel accuracy."""
    row = {key: report[key] for key in ("miou", "mean_f1", "mean_e_measure", "pixel_accuracy")}
    for band in report["trimap"]:
        row[f"boundary_miou@{band['band_width']}"] = band["boundary_miou"]
        row[f"non_boundary_miou@{band['band_width']}"] = band["non_boundary_miou"]
    return row


def table_keys() -> list[str]:
    return ["miou", f"boundary_miou@{TABLE_BAND}", f"non_boundary_miou@{TABLE_BAND}", "mean_f1", "mean_e_measure"]


def convergence(history: list[dict]) -> dict:
    """The val mIoU curve's last stretch: the gain over the last CONVERGENCE_TAIL of the epochs (final val mIoU
    minus the last one validated at or before that point); `converged` when under CONVERGED_GAIN."""
    points = [(h["epoch"], h["val_miou"]) for h in history if h.get("val_miou") is not None]
    if len(points) < 2:
        return {"tail_gain": None, "converged": None, "evaluations": len(points)}
    cut = points[-1][0] * (1 - CONVERGENCE_TAIL)
    before = [value for epoch, value in points if epoch <= cut] or [points[0][1]]
    gain = points[-1][1] - before[-1]
    return {"tail_gain": gain, "converged": gain < CONVERGED_GAIN, "evaluations": len(points)}


def train_time(entry: dict) -> str:
    """A run's training wall-clock in seconds: its epochs' own `seconds` when every epoch has them (history.json
    keeps them through pieces that were killed), else what its logged pieces add up to, marked as a lower bound
    (runs trained before epochs were timed)."""
    history = entry["history"]
    if history and all("seconds" in h for h in history):
        return f"{sum(h['seconds'] for h in history):.0f}"
    logged = sum(p.get("train_seconds_this_run") or 0 for p in entry["pieces"])
    return f">= {logged:.0f} (pieces logged)" if logged else "n/a"


# ------------------------------------------------------------------------------------------------ statistics
def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (ddof 1; None for one value)."""
    array = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if array.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if array.size > 1 else None,
            "n": int(array.size)}


def sign_flip_p(values: np.ndarray, seed: int = 0) -> tuple[float, str]:
    """Two-sided p of mean(values) under random signs (the null of a symmetric paired difference):
    scipy.stats.permutation_test on one sample, exact up to 2^n <= SIGN_FLIP_RESAMPLES patterns, drawn beyond."""
    result = scipy.stats.permutation_test((np.asarray(values, dtype=np.float64),), np.mean,
                                          permutation_type="samples", n_resamples=SIGN_FLIP_RESAMPLES,
                                          rng=np.random.default_rng(seed))
    exact = 2 ** len(values) <= SIGN_FLIP_RESAMPLES
    return float(result.pvalue), ("exact over all sign patterns" if exact else f"{SIGN_FLIP_RESAMPLES} seeded draws")


def paired_t_p(differences: np.ndarray) -> tuple[float | None, str]:
    """Two-sided paired t-test p (scipy.stats.ttest_1samp of the differences against 0)."""
    if differences.size < 2 or np.std(differences) == 0:
        return None, "paired t-test (undefined: fewer than 2 pairs or no spread)"
    return float(scipy.stats.ttest_1samp(differences, 0.0).pvalue), "paired t-test"


def wilcoxon_p(differences: np.ndarray) -> tuple[float | None, str]:
    """Wilcoxon signed-rank test, two-sided, zero differences dropped (scipy.stats.wilcoxon)."""
    if not np.any(differences != 0):
        return None, "Wilcoxon signed-rank (undefined: every difference is 0)"
    return float(scipy.stats.wilcoxon(differences, zero_method="wilcox").pvalue), "Wilcoxon signed-rank"


def paired_by_seed(first: dict[int, float], second: dict[int, float]) -> dict:
    """second - first over the seeds both have: per-seed differences, paired t-test and sign-flip test."""
    seeds = sorted(set(first) & set(second))
    differences = np.array([second[s] - first[s] for s in seeds], dtype=np.float64)
    t_p, t_how = paired_t_p(differences)
    flip_p, flip_how = sign_flip_p(differences) if len(seeds) > 1 else (None, "fewer than 2 common seeds")
    return {"seeds": seeds, "differences": differences.tolist(), "mean_difference": _mean(differences),
            "t_test_p": t_p, "t_test": t_how, "sign_flip_p": flip_p, "sign_flip": f"sign-flip permutation, {flip_how}"}


def paired_by_image(first: list[float | None], second: list[float | None]) -> dict:
    """second - first per image (images either scores as None dropped): Wilcoxon signed-rank and counts."""
    pairs = [(a, b) for a, b in zip(first, second) if a is not None and b is not None]
    differences = np.array([b - a for a, b in pairs], dtype=np.float64)
    p, how = wilcoxon_p(differences)
    return {"images": len(pairs), "mean_difference": _mean(differences),
            "median_difference": float(np.median(differences)) if pairs else None,
            "second_better": int(np.sum(differences > 0)), "first_better": int(np.sum(differences < 0)),
            "p": p, "test": how}


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


# ------------------------------------------------------------------------------------------------ plots, page
def plot_curves(histories: dict[str, list[dict]], styles: dict[str, dict], path: Path) -> None:
    """Val mIoU per validation and the epoch's mean training PPCE against epoch, one line per run (`styles`: its
    matplotlib line style, e.g. colour by group and dashes by seed)."""
    fig, (ax_miou, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    for name, history in histories.items():
        validated = [h for h in history if h.get("val_miou") is not None]
        style = {"label": name, "linewidth": 1.2, "marker": ".", **styles.get(name, {})}
        ax_miou.plot([h["epoch"] for h in validated], [100 * h["val_miou"] for h in validated], **style)
        ax_loss.plot([h["epoch"] for h in history], [h.get("ppce", math.nan) for h in history], **style)
    ax_miou.set(xlabel="epoch", ylabel="val mIoU (%)", title="validation mIoU (convergence)")
    ax_loss.set(xlabel="epoch", ylabel="train PPCE (epoch mean)", title="training cross entropy", yscale="log")
    for ax in (ax_miou, ax_loss):
        ax.grid(alpha=0.3)
    ax_loss.legend(fontsize=7, loc="upper right")
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: line styles of the curves by seed order (solid, dashed, dotted, dash-dot)
SEED_DASHES = ("-", "--", ":", "-.")


def run_styles(runs: list[PlannedRun]) -> dict[str, dict]:
    """A colour per group and a dash pattern per seed, for plot_curves."""
    groups = list(dict.fromkeys(run.group for run in runs))
    seeds = sorted({run.seed for run in runs})
    return {run.name: {"color": f"C{groups.index(run.group) % 10}",
                       "linestyle": SEED_DASHES[seeds.index(run.seed) % len(SEED_DASHES)]} for run in runs}


def yes_no(flag: bool | None) -> str:
    return "n/a" if flag is None else ("yes" if flag else "no")


def plus_minus(figure: dict) -> str:
    """A mean_std() figure in percent: `mean +- std`, or "" when there is none."""
    if figure["mean"] is None:
        return ""
    return f"{100 * figure['mean']:.2f}" + ("" if figure["std"] is None else f" +- {100 * figure['std']:.2f}")


def percent(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{100 * value:.{digits}f}"


def trained_on(results: dict[str, dict]) -> list[str]:
    """Where and in what precision the runs trained, e.g. 'cpu (bf16)': from their epochs (history.json) and their
    pieces (pieces.jsonl), since a piece killed before its end logs its epochs but no piece."""
    logged = [row for e in results.values() for row in (*e["history"], *e["pieces"])]
    return sorted({f"{row['device']} ({row.get('amp') or 'off'})" for row in logged if row.get("device")})


def html_table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_page(path: Path, title: str, parts: list[str]) -> None:
    """index.html: `parts` are HTML fragments (paragraphs, tables from html_table, <img> of the plots)."""
    style = ("body{font-family:sans-serif;max-width:1200px;margin:1em auto}table{border-collapse:collapse;"
             "margin:.5em 0}td,th{border:1px solid #bbb;padding:2px 8px;text-align:right}img{max-width:100%}")
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                    f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{''.join(parts)}</body></html>")


def train_plan(expand: Callable[[], list[PlannedRun]], args: argparse.Namespace,
               folders: RunFolders) -> tuple[list[PlannedRun], torch.device] | None:
    """How a plan's script starts: `--list` prints the plan; else the device is announced and what is left is
    trained (none with `--report-only`). The plan and the device to report on, or None where `--list` or
    `--train-only` ends the script."""
    if args.list:
        print_plan(expand(), folders)
        return None
    device = announce_device(args)
    if not args.report_only:
        execute(expand, args, folders)
    return None if args.train_only else (expand(), device)


def announce_device(args: argparse.Namespace) -> torch.device:
    """Resolve --device, apply --threads (training sets it too; evaluation alone needs it here) and print which
    device runs, e.g. 'device: cuda:0 (NVIDIA H200)', before anything trains."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"device: {describe_device(device)} (--device {args.device})", flush=True)
    return device
