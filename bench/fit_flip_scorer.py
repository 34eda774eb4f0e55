"""Fit the flip detector's patch scorer (`monitor.counterfactual.PatchScorer`) on tuning clips, and say how well it
does on seeds it was not fitted on (leave one seed out).

The detector runs over every clip of the tuning seeds with the scorer silenced, and every blob whose counterfactual
reverted enough is kept with its cues. Positives: per effective patched clip, the blob that reverted most within
`--within` frames of the patch's onset. Negatives: every blob of a clean clip, and of a patched clip before its
onset. A logistic regression (L2, classes balanced; torch's L-BFGS) is fitted on standardised cues; the
standardisation is folded into the weights, so the scorer weighs cues in their own units.

Left-one-seed-out, it reports what the first look alone would catch per threshold (false alarms counted per blob:
an object arriving over several frames is several). It chooses no threshold: every alarm waits for the second look,
and bench/fit_second_look.py, run next on these weights, chooses both thresholds together (they share one budget of
false alarms). The clips are read one seed at a time (a seed's clips take ~0.3 GB). The scoring seeds of
bench/monitor_detection.py are never read here.

    python bench/fit_flip_scorer.py    # tuning seeds 0-5,20-30 -> bench/results/monitor/scorer.json (+ .png): weights
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: probabilities the first look alone is reported at (0.50 to 0.98 in steps of 0.01)
THRESHOLDS = tuple(round(0.5 + 0.01 * step, 2) for step in range(49))
#: the tuning seeds the shipped weights were fitted on (31-46 were scoring seeds; 6-19 were never rendered)
TUNE_SEEDS = "0-5,20-30"


@dataclass
class Scored:
    """One blob's cues, where it came from, and whether it is the patch."""

    seed: int
    clip: int
    frame: int
    cues: list[float]
    clean: bool  # from a clean clip (a patched clip's blobs before onset are not counted as clean false alarms)
    patch: bool | None  # None: a patched clip's blob in the window that is not its strongest (left out)


def collect(clips, names, relabel, within: int, min_flip: int, settings: dict | None = None
            ) -> tuple[list[Scored], dict]:
    """Every scored blob of every clip, labelled; and per seed the effective patches and clean frames. `settings`
    are `FlipConfig` fields for the detector that finds the blobs."""
    from monitor.counterfactual import CUES, PatchScorer
    from monitor.flips import FlipConfig, FlipDetector

    silent = FlipConfig(**(settings or {}), skip_hopeless=False,
                        scorer=PatchScorer(bias=-60.0, weights={c: 0.0 for c in CUES}, threshold=1.0))
    rows, totals = [], {}
    for number, clip in enumerate(tqdm(clips, desc="cues of every blob")):
        seed_totals = totals.setdefault(clip.seed, {"effective": 0, "clean_frames": 0})
        if clip.kind == "patched" and clip.flipped_at_onset < min_flip:
            continue
        if clip.kind == "patched":
            seed_totals["effective"] += 1
        else:
            seed_totals["clean_frames"] += len(clip.frames)
        detector = FlipDetector(names, "fit", silent, relabel=relabel)
        blobs = []
        for index, (rgb, labels) in enumerate(zip(clip.frames, clip.labels)):
            if index in clip.cuts:
                detector.reset()
            detector.update(index, rgb, labels)
            blobs += [(index, b) for b in detector.last_blobs if b.cues is not None]
        rows += label(clip, number, blobs, within)
    return rows, totals


def label(clip, number: int, blobs, within: int) -> list[Scored]:
    from monitor.counterfactual import CUES

    def row(index, blob, patch):
        return Scored(clip.seed, number, index, [blob.cues[c] for c in CUES], clip.kind != "patched", patch)

    if clip.kind != "patched":
        return [row(i, b, False) for i, b in blobs]
    window = [(i, b) for i, b in blobs if clip.onset <= i <= clip.onset + within]
    strongest = max(window, key=lambda item: int(item[1].reverted.sum()), default=(None, None))[1]
    return ([row(i, b, False) for i, b in blobs if i < clip.onset]
            + [row(i, b, b is strongest or None) for i, b in window])


def fit(rows: list[Scored], c: float) -> tuple[np.ndarray, float]:
    """Weights (in the cues' own units) and bias of an L2 logistic regression, classes balanced."""
    import torch

    x = np.array([r.cues for r in rows if r.patch is not None], np.float64)
    y = np.array([r.patch for r in rows if r.patch is not None], np.float64)
    mean, scale = x.mean(0), x.std(0) + 1e-9
    xs, yt = torch.tensor((x - mean) / scale), torch.tensor(y)
    weight = torch.where(yt > 0, len(y) / (2 * y.sum()), len(y) / (2 * (len(y) - y.sum())))
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = (weight * torch.nn.functional.binary_cross_entropy_with_logits(xs @ w + b, yt, reduction="none")).sum()
        loss = loss + 0.5 / c * (w ** 2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    weights = w.detach().numpy() / scale
    return weights, float(b.detach()) - float((weights * mean).sum())


def probabilities(rows: list[Scored], weights: np.ndarray, bias: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(np.array([r.cues for r in rows]) @ weights + bias)))


def outcome(rows: list[Scored], p: np.ndarray, threshold: float, totals: dict) -> tuple[int, int, int, int]:
    """(patches caught, effective patches, false alarms on clean clips, clean frames) at a threshold."""
    caught = {(r.seed, r.clip) for r, q in zip(rows, p) if r.patch is not False and q >= threshold}
    false = sum(1 for r, q in zip(rows, p) if r.clean and q >= threshold)
    seeds = {r.seed for r in rows}
    return (len(caught), sum(totals[s]["effective"] for s in seeds), false,
            sum(totals[s]["clean_frames"] for s in seeds))


def leave_one_seed_out(rows: list[Scored], totals: dict, c: float) -> dict[float, tuple[int, int, int, int]]:
    seeds = sorted({r.seed for r in rows})
    table = {t: np.zeros(4, int) for t in THRESHOLDS}
    for held in seeds:
        weights, bias = fit([r for r in rows if r.seed != held], c)
        test = [r for r in rows if r.seed == held]
        p = probabilities(test, weights, bias)
        for t in THRESHOLDS:
            table[t] += outcome(test, p, t, totals)
    return {t: tuple(int(v) for v in row) for t, row in table.items()}


def plot(table, scorer, out: Path) -> None:
    """Left-one-seed-out detection against false alarms per threshold, counted per blob, and the weights."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    rates = {t: (1000 * v[2] / v[3], v[0] / v[1]) for t, v in table.items()}
    axes[0].plot(*zip(*rates.values()), "o-", color="tab:red", ms=3, label="false alarms counted per blob")
    for t, (false, caught) in rates.items():
        if round(100 * t) % 5:  # label every 0.05
            continue
        axes[0].annotate(f"{t:.2f}", (false, caught), textcoords="offset points", xytext=(4, -10), fontsize=8)
    axes[0].axvline(0.5, color="k", ls="--", lw=1)
    axes[0].axhline(0.95, color="k", ls=":", lw=1)
    axes[0].set(xlabel="false alarms / 1000 clean frames", ylabel="effective patches caught within 3 frames",
                title="first looks alone, left one tuning seed out, per threshold")
    axes[0].legend(loc="lower right", fontsize=8)
    plot_weights(axes[1], scorer.weights, "the scorer's weights")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def tuning_arguments(description: str) -> argparse.ArgumentParser:
    """The arguments every fit on tuning clips takes: the engine, the campaign, the seeds, the fit's strength, the
    detector's settings and how the clips are drawn (as bench/monitor_detection.py draws them)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--engine", default="bench/results/shapes/unet.onnx")
    parser.add_argument("--run", default="bench/results/seed000_shapes")
    parser.add_argument("--tune-seeds", default=TUNE_SEEDS, help="numbers and ranges, e.g. 0-5,20-42")
    parser.add_argument("--c", type=float, default=0.1, help="inverse L2 strength on standardised cues")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a FlipConfig field of the detector, e.g. --set footprint_px=5")
    parser.add_argument("--within", type=int, default=3)
    parser.add_argument("--min-flip", type=int, default=40)
    for name, default in (("effective", 100), ("max-clips", 400), ("frames", 30), ("clean-scenes", 10),
                          ("clean-frames", 50), ("workers", 2)):
        parser.add_argument(f"--{name}", type=int, default=default, help="as bench/monitor_detection.py")
    parser.add_argument("--cache", default="bench/results/monitor/clips")
    return parser


def plot_weights(axis, weights: dict[str, float], title: str) -> None:
    names = list(weights)
    axis.barh(names, [weights[n] for n in names], color="tab:blue")
    axis.set(xlabel="weight (cue in its own units)", title=title)


def parse_args() -> argparse.Namespace:
    parser = tuning_arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--without", default="", help="comma-separated cues left out of the fit (weight 0): what "
                        "a cue adds, measured on the same clips")
    parser.add_argument("--out", default="bench/results/monitor/scorer.json")
    return parser.parse_args()


def tuning_clips(args):
    """The engine, every clip of the tuning seeds (rendered once, cached; read one seed at a time, as iterated) and
    the `--set` detector settings."""
    import cv2
    from monitor_detection import seed_clips, seeds

    from audit.store import trial_scenes
    from export import OnnxRuntimeEngine

    numbers = seeds(args.tune_seeds)
    if len(numbers) < 2:
        raise SystemExit(f"--tune-seeds {args.tune_seeds!r}: leaving one seed out needs at least two")
    cv2.setNumThreads(1)
    engine = OnnxRuntimeEngine(args.engine)
    scenes = trial_scenes(args.run)
    clips = (clip for seed in numbers for clip in seed_clips(engine, scenes, seed, args))
    return engine, clips, dict(item.split("=", 1) for item in args.set)


def main() -> None:
    args = parse_args()
    from monitor.counterfactual import CUES, PatchScorer

    engine, clips, settings = tuning_clips(args)
    rows, totals = collect(clips, [c.name for c in engine.spec.classes], engine.segment, args.within, args.min_flip,
                           settings)
    left_out = {c.strip() for c in args.without.split(",") if c.strip()}
    if left_out - set(CUES):
        raise SystemExit(f"unknown cues {sorted(left_out - set(CUES))}; the cues are {', '.join(CUES)}")
    print(f"{totals and sum(t['effective'] for t in totals.values())} effective patches; "
          f"{len({(r.seed, r.clip) for r in rows if r.patch is not False and not r.clean})} have a scored blob "
          "within the window (the most any threshold can catch)")
    used = [i for i, c in enumerate(CUES) if c not in left_out]
    rows = [replace(r, cues=[r.cues[i] for i in used]) for r in rows]
    table = leave_one_seed_out(rows, totals, args.c)
    for t, (caught, effective, false, frames) in table.items():
        print(f"threshold {t:.2f}: left-one-seed-out {caught}/{effective} = {caught / effective:.1%} caught, "
              f"{false} false alarms in {frames} clean frames = {1000 * false / frames:.2f} per 1000")
    fitted, bias = fit(rows, args.c)
    weights = dict.fromkeys(CUES, 0.0) | {CUES[i]: round(float(w), 4) for i, w in zip(used, fitted)}
    scorer = PatchScorer(weights=weights, bias=round(bias, 4))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"scorer": scorer.model_dump(), "tune_seeds": args.tune_seeds,
                                          "left_one_seed_out": {str(t): v for t, v in table.items()}}, indent=1))
    print("weights (set them in monitor.counterfactual.FITTED_WEIGHTS and PatchScorer.bias, then run "
          "bench/fit_second_look.py):")
    print(json.dumps(scorer.model_dump(), indent=1))
    plot(table, scorer, Path(args.out).with_suffix(".png"))
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')}")


if __name__ == "__main__":
    main()
