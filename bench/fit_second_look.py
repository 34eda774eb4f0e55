"""Fit the flip detector's second look (`monitor.second_look.SecondLookScorer`) on tuning clips, and say how well
the detector does with it on seeds it was not fitted on (leave one seed out).

The two looks share one budget of false alarms, so this also chooses the first look's threshold: the detector runs
over every clip of the tuning seeds with the patch scorer's weights as configured, its threshold raised to 1 and
the second look silenced, so that every blob scoring `--fit-from` or more gets a look; every look is kept with its
cues and the first look's (`SECOND_LOOK_CUES`, the first of which is the blob's first score). The fit learns from
all of them; the detector looks only from its `look_from` (FlipConfig's, or `--set look_from=`), and the catches
and false alarms count those alone.
Positives: a patched clip's looks at blobs that appeared at or after the patch's onset, taken within `--within`
frames of it. Negatives: every look of a clean clip, and of a patched clip at a blob that appeared before its
onset. The fit is scikit-learn's gradient boosting (`--trees` trees of depth `--depth`, log-loss, classes balanced
by sample weights), written out as the scorer's own trees: the counts below are the scorer's, not scikit-learn's.

The thresholds (first, second) are the pair that, left-one-seed-out, catches the most effective patches with at
most `--max-false` false alarms per 1000 clean frames: a patch is caught when its blob's first score reaches the
first threshold or its look reaches the second; the false alarms are every clean look that does either (counted per
look: the detector raises one alarm per region, so this errs on the safe side). The scoring seeds of
bench/monitor_detection.py are never read here.

    python bench/fit_second_look.py    # tuning seeds -> bench/results/monitor/second_look.json (+ .png)
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fit_flip_scorer import Scored, tuning_arguments, tuning_clips  # noqa: E402

#: the seeds the shipped trees were fitted on: the first scorer's, and 31-46, whose scoring of earlier detectors is
#: done (bench/monitor_detection.py's scoring seeds are the next ones rendered)
TUNE_SEEDS = "0-5,20-46"
#: probabilities the second look's threshold is chosen from (0.10 to 0.98 in steps of 0.01)
THRESHOLDS = tuple(round(0.1 + 0.01 * step, 2) for step in range(89))
#: and the first look's (0.60 to 0.98, and 1: no alarm on a first look), the pair together
FIRST_THRESHOLDS = (*(round(0.6 + 0.01 * step, 2) for step in range(39)), 1.0)


@dataclass
class ClipOutcome:
    """What the first looks did on one clip."""

    seed: int
    clip: int
    clean: bool
    effective: bool  # a patched clip whose patch is effective (clean clips: False)
    caught: bool  # an alarm within the window whatever the thresholds (a first score of 1: patched clips)
    false: int  # the same on clean clips
    frames: int


def collect(clips, names, relabel, within: int, min_flip: int, settings: dict
            ) -> tuple[list[Scored], list[ClipOutcome]]:
    """Every look of every clip, labelled, and each clip's alarms (only a first score of 1 raises one here)."""
    from monitor.flips import FlipConfig, FlipDetector
    from monitor.second_look import SECOND_LOOK_CUES, SecondLookScorer

    scorer = FlipConfig(**settings).scorer.model_copy(update={"threshold": 1.0})
    # silenced, no blob could alarm: `skip_hopeless` off, or no blob would be checked at all
    silent = FlipConfig(**settings | {"scorer": scorer}, skip_hopeless=False,
                        second_look=SecondLookScorer(trees=(), bias=-60.0, threshold=1.0))
    rows, outcomes = [], []
    for number, clip in enumerate(tqdm(clips, desc="second looks of every clip")):
        patched = clip.kind == "patched"
        if patched and clip.flipped_at_onset < min_flip:
            continue
        detector, alarms, looks = FlipDetector(names, "fit", silent, relabel=relabel), [], []
        for index, (rgb, labels) in enumerate(zip(clip.frames, clip.labels)):
            if index in clip.cuts:
                detector.reset()
            alarms += detector.update(index, rgb, labels)
            looks += [(index, look) for look in detector.last_looks]
        caught = patched and any(clip.onset <= a.frame <= clip.onset + within for a in alarms)
        outcomes.append(ClipOutcome(clip.seed, number, not patched, patched, caught,
                                    0 if patched else len(alarms), len(clip.frames)))
        rows += [Scored(clip.seed, number, index, [(look.first_cues | look.cues)[c] for c in SECOND_LOOK_CUES],
                        not patched, label(clip, look.first_frame, index, within)) for index, look in looks]
    return rows, outcomes


def label(clip, first_frame: int, frame: int, within: int) -> bool | None:
    """Whether a look is at the patch: True, False, or None (after the window: neither)."""
    if clip.kind != "patched" or first_frame < clip.onset:
        return False
    return True if frame <= clip.onset + within else None


def fit(rows: list[Scored], trees: int, depth: int, rate: float, min_leaf: int):
    """The second look fitted on the labelled rows: gradient-boosted trees (log-loss, classes balanced), as a
    `SecondLookScorer` (threshold 0.5 until one is chosen) with each cue's share of the trees' gain."""
    from sklearn.ensemble import GradientBoostingClassifier

    from monitor.second_look import SECOND_LOOK_CUES, SecondLookScorer

    x = np.array([r.cues for r in rows if r.patch is not None], np.float64)
    y = np.array([r.patch for r in rows if r.patch is not None], bool)
    balance = np.where(y, 0.5 / y.mean(), 0.5 / (1.0 - y.mean()))
    model = GradientBoostingClassifier(n_estimators=trees, max_depth=depth, learning_rate=rate,
                                       min_samples_leaf=min_leaf, random_state=0)
    model.fit(x, y, sample_weight=balance)
    fitted = tuple(as_tree(estimator.tree_, 0, rate) for estimator in model.estimators_[:, 0])
    # the prior's log-odds: what the model says before its trees
    bias = float(model.decision_function(x[:1])[0]) - rate * sum(float(e.predict(x[:1])[0])
                                                                   for e in model.estimators_[:, 0])
    scorer = SecondLookScorer(trees=fitted, bias=round(bias, 4), threshold=0.5)
    return scorer, dict(zip(SECOND_LOOK_CUES, model.feature_importances_.tolist()))


def as_tree(tree, node: int, rate: float):
    """scikit-learn's tree from `node` down as `(cue, cut, below, above)`, leaves as log-odds (times the rate)."""
    from monitor.second_look import SECOND_LOOK_CUES

    below, above = int(tree.children_left[node]), int(tree.children_right[node])
    if below == above:  # a leaf: scikit-learn marks both children -1
        return round(rate * float(tree.value[node].ravel()[0]), 4)
    # the cut keeps 7 significant digits: it lies halfway between two values the fit saw
    return (SECOND_LOOK_CUES[int(tree.feature[node])], float(f"{tree.threshold[node]:.7g}"),
            as_tree(tree, below, rate), as_tree(tree, above, rate))


def as_literal(trees) -> str:
    """The trees as the Python literal `monitor/second_look.py` keeps them in, one tree a line."""
    return "FITTED_LOOK_TREES = (\n" + "".join(f"    {tree!r},\n" for tree in trees) + ")"


def probabilities(rows: list[Scored], scorer) -> np.ndarray:
    from monitor.second_look import SECOND_LOOK_CUES

    return np.array([scorer.probability(dict(zip(SECOND_LOOK_CUES, r.cues))) for r in rows])


def first_probability(row: Scored) -> float:
    return 1.0 / (1.0 + np.exp(-row.cues[0]))  # the first cue is the first score's log-odds


def outcome(rows: list[Scored], p: np.ndarray, outcomes: list[ClipOutcome], first: float, second: float
            ) -> tuple[int, int, int, int]:
    """(patches caught, effective patches, false alarms, clean frames) of the clips in `outcomes`, with the first
    look alarming from `first` and the second from `second`."""
    alarmed = [r for r, q in zip(rows, p) if first_probability(r) >= first or q >= second]
    caught = {(o.seed, o.clip) for o in outcomes if o.caught} | {(r.seed, r.clip) for r in alarmed if r.patch}
    false = sum(o.false for o in outcomes) + sum(1 for r in alarmed if r.clean)
    return (len(caught), sum(o.effective for o in outcomes), false, sum(o.frames for o in outcomes if o.clean))


def leave_one_seed_out(rows, outcomes, look_from: float, **fit_settings
                       ) -> dict[tuple[float, float], tuple[int, int, int, int]]:
    """(caught, effective, false alarms, clean frames) per (first, second) threshold pair; second = 1.0 is the
    first look alone. Fitted on every look, counted on those the detector takes (first score `look_from` or more)."""
    pairs = [(first, second) for first in FIRST_THRESHOLDS for second in (*THRESHOLDS, 1.0)]
    table = {pair: np.zeros(4, int) for pair in pairs}
    for held in sorted({o.seed for o in outcomes}):
        scorer, _ = fit([r for r in rows if r.seed != held], **fit_settings)
        test = [r for r in rows if r.seed == held and first_probability(r) >= look_from]
        p = probabilities(test, scorer)
        held_outcomes = [o for o in outcomes if o.seed == held]
        for pair in pairs:
            table[pair] += outcome(test, p, held_outcomes, *pair)
    return {pair: tuple(int(v) for v in row) for pair, row in table.items()}


def choose(table, max_false: float):
    """The key (a threshold, or a pair) catching most with at most `max_false` false alarms per 1000 clean frames
    (ties: the higher thresholds)."""
    allowed = [key for key, (_, _, false, frames) in table.items() if 1000 * false / frames <= max_false]
    return max(allowed or [max(table)], key=lambda key: (table[key][0], key))


def plot(table, chosen: tuple[float, float], importances: dict[str, float], out: Path) -> None:
    """Left-one-seed-out detection against false alarms: the first look alone over its thresholds, and with the
    second look over its thresholds at the chosen first one (the pair chosen marked); and what the trees use."""
    import matplotlib.pyplot as plt

    def rates(keys):
        return [1000 * table[k][2] / table[k][3] for k in keys], [table[k][0] / table[k][1] for k in keys]

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    axes[0].plot(*rates([(first, 1.0) for first in FIRST_THRESHOLDS]), "o-", color="tab:red", ms=3,
                 label="first look alone, per its threshold")
    axes[0].plot(*rates([(chosen[0], second) for second in THRESHOLDS]), "o-", color="tab:green", ms=3,
                 label=f"with the second look, per its threshold (first at {chosen[0]})")
    axes[0].plot(*rates([chosen]), "ks", ms=10, mfc="none", label=f"chosen: {chosen}")
    axes[0].axvline(0.5, color="k", ls="--", lw=1)
    axes[0].axhline(0.95, color="k", ls=":", lw=1)
    axes[0].set(xlabel="false alarms / 1000 clean frames", ylabel="effective patches caught within the window",
                xlim=(0, 3), title="left one tuning seed out")
    axes[0].legend(loc="lower right", fontsize=8)
    names = sorted(importances, key=importances.get)
    axes[1].barh(names, [importances[n] for n in names], color="tab:blue")
    axes[1].set(xlabel="share of the trees' gain", title="what the second look's trees use")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    parser = tuning_arguments(__doc__.split("\n\n")[0])
    parser.set_defaults(tune_seeds=TUNE_SEEDS)
    # the goal is 0.5, and fresh seeds have raised more false alarms than the tuning seeds left out every time:
    # with the trees chosen at 0.4 (threshold 0.22, 0.36 left out), scoring seeds 47-50 gave 1.00 per 1000 (5 of
    # the 12 from one scene whose labels flicker); so a margin of 2.5x
    parser.add_argument("--max-false", type=float, default=0.2, help="false alarms per 1000 clean frames allowed")
    parser.add_argument("--first-look-alarms", action=argparse.BooleanOptionalAction, default=False,
                        help="let a first look alarm on its own (default: every alarm waits for its second look: on "
                        "seeds 26, 35, 36 and 38, objects entering the view raised 9 false alarms, 6 of the 7 on 26 "
                        "and 38 from a first look at 0.82-0.97; through the second look, 2 remained)")
    parser.add_argument("--fit-from", type=float, default=0.2, help="fit on the looks at blobs whose first score "
                        "reaches this (the detector's own `look_from` and up are what is counted)")
    parser.add_argument("--trees", type=int, default=100, help="boosted trees (left one seed out on 33 tuning seeds at "
                        "0.4 false alarms per 1000: 100 of depth 2 caught 96.0 %%, 30 95.6 %%, a logistic second "
                        "look 94.8 %%)")
    parser.add_argument("--depth", type=int, default=2, help="each tree's depth")
    parser.add_argument("--learning-rate", type=float, default=0.1, help="boosting's shrinkage")
    parser.add_argument("--min-leaf", type=int, default=50, help="looks a leaf holds at least: no leaf for a few "
                        "near-identical looks of one clip (left one seed out: 96.1 %% at 0.36 per 1000, 96.0 %% at "
                        "0.38 with 1)")
    parser.add_argument("--out", default="bench/results/monitor/second_look.json")
    return parser.parse_args()


def report(table, max_false: float) -> None:
    """Per first-look threshold: it alone, and the best second-look threshold within the budget."""
    def line(key):
        caught, effective, false, frames = table[key]
        return f"{caught}/{effective} = {caught / effective:.1%} caught, {1000 * false / frames:.2f} false per 1000"

    for first in FIRST_THRESHOLDS:
        best = choose({k: v for k, v in table.items() if k[0] == first and k[1] < 1.0}, max_false)
        print(f"first look from {first:.2f}: alone {line((first, 1.0))}; second look from {best[1]:.2f}: {line(best)}")


def main() -> None:
    args = parse_args()
    from monitor.flips import FlipConfig

    engine, clips, settings = tuning_clips(args)
    look_from = FlipConfig(**settings).look_from
    rows, outcomes = collect(clips, [c.name for c in engine.spec.classes], engine.segment, args.within,
                             args.min_flip, settings | {"look_from": min(args.fit_from, look_from)})
    fit_settings = {"trees": args.trees, "depth": args.depth, "rate": args.learning_rate, "min_leaf": args.min_leaf}
    table = leave_one_seed_out(rows, outcomes, look_from, **fit_settings)
    report(table, args.max_false)
    first, second = choose(table if args.first_look_alarms else {k: v for k, v in table.items() if k[0] == 1.0},
                           args.max_false)
    scorer, importances = fit(rows, **fit_settings)
    scorer = scorer.model_copy(update={"threshold": second})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"second_look": scorer.model_dump(), "first_look_threshold": first,
                                          "tune_seeds": args.tune_seeds, "fit": fit_settings,
                                          "fit_from": args.fit_from, "look_from": look_from,
                                          "left_one_seed_out": {f"{a},{b}": v for (a, b), v in table.items()}},
                                         indent=1))
    print(f"thresholds: first look {first}, second look {second} (at most {args.max_false} false alarms per 1000 "
          "left-one-seed-out); set the first in PatchScorer.threshold")
    print(f"SecondLookScorer: bias {scorer.bias}, threshold {second}; in monitor/second_look.py:")
    print(as_literal(scorer.trees))
    plot(table, (first, second), importances, Path(args.out).with_suffix(".png"))
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')}")


if __name__ == "__main__":
    main()
