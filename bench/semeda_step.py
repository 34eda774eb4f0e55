"""What a SEMEDA training step costs over a PPCE one, in this tree and in a baseline revision (issue 18, item 2).

Times `segmenters.training.training_throughput` (train()'s own step: model, criterion, AdamW, precision) at the fair
plan's setting: LR-ASPP, 180x240 crops, batch 8, CamVid's classes, fp32 on the CPU, compiled as each tree's train()
compiles it there by default (`--compile off`: eager; compiling happens in the untimed warm-up steps). Each
`--losses` setting runs in its own process, once in the working tree and once in `--baseline` (that revision's
`segmenters/`, from `git archive`), alternating, `--repeats` times; the figure is the median s/step. Prints each
setting's ratio to PPCE (same code) and this tree's ratio to the baseline (same setting). A setting the baseline
cannot run (an argument it lacks) is reported as such. Writes `semeda_step.json` under `--out`.

    python bench/semeda_step.py --baseline 4f4fc5d
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python bench/semeda_step.py`: make `bench.camvid_runs` importable
    sys.path.insert(0, str(REPO))

from bench.camvid_runs import FAIR_CROP, parse_size  # noqa: E402
from segmenters.data.real import CamVid  # noqa: E402

SETTINGS = {"ppce": ("ppce", None), "sobel-4": ("sobel", (4.0,)), "semeda-4-2-0": ("semeda", (4.0, 2.0, 0.0)),
            "semeda-0.5-0.5-0.5": ("semeda", (0.5, 0.5, 0.5))}
# One process times one setting; it prints its figure as JSON on its last line.
WORKER = """
import inspect, json, sys
from segmenters.losses import DEFAULT_LAMBDAS
from segmenters.training import resolve_compile, training_throughput
arch, height, width, batch, classes, steps, warmup, loss, lambdas, compile_mode = json.loads(sys.argv[1])
# auto: the tree's own CPU default; a revision whose resolve_compile knows no loss compiled nothing on the CPU
if compile_mode == "auto" and "loss" not in inspect.signature(resolve_compile).parameters:
    compile_mode = False
# the loss's own default needs no argument: a revision from before training_throughput took lambdas runs it too
default = lambdas is None or tuple(lambdas) == DEFAULT_LAMBDAS[loss]
extra = {} if default else {"lambdas": tuple(lambdas)}
try:
    figure = training_throughput(arch, (height, width), batch, "cpu", amp="off", steps=steps, warmup=warmup,
                                 classes=classes, loss=loss, compile=compile_mode, **extra)
    print(json.dumps({"s_per_step": figure["seconds"] / figure["steps"]}))
except TypeError as error:
    print(json.dumps({"error": str(error)}))
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="HEAD", help="git revision whose segmenters/ is the baseline")
    parser.add_argument("--losses", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--arch", default="lraspp_mobilenetv3")
    parser.add_argument("--crop", default=FAIR_CROP, help="HEIGHTxWIDTH of a training crop")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compile", choices=("auto", "off"), default="auto",
                        help="auto: each tree's own CPU default (this one compiles a SEMEDA loss); off: eager")
    parser.add_argument("--out", default="bench/results/semeda_step")
    return parser.parse_args(argv)


def baseline_tree(revision: str, folder: Path) -> Path:
    """`revision`'s segmenters/ package, unpacked under `folder` (put first on PYTHONPATH)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, "segmenters"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def time_setting(code: Path, args: argparse.Namespace, setting: str) -> dict:
    loss, lambdas = SETTINGS[setting]
    height, width = parse_size(args.crop)
    compile_mode = "auto" if args.compile == "auto" else False
    job = [args.arch, height, width, args.batch, len(CamVid.classes), args.steps, args.warmup, loss, lambdas,
           compile_mode]
    # cwd too: `python -c` puts the working directory first on sys.path, before PYTHONPATH
    done = subprocess.run([sys.executable, "-c", WORKER, json.dumps(job)], capture_output=True, text=True,
                          cwd=code, env={**os.environ, "PYTHONPATH": str(code)}, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace, trees: dict[str, Path]) -> dict[str, dict[str, dict]]:
    samples = {tree: {setting: [] for setting in args.losses} for tree in trees}
    jobs = [(setting, tree) for _ in range(args.repeats) for setting in args.losses for tree in trees]
    for setting, tree in tqdm(jobs, desc="training steps"):
        samples[tree][setting].append(time_setting(trees[tree], args, setting))
    return {tree: {setting: _median(figures) for setting, figures in settings.items()}
            for tree, settings in samples.items()}


def _median(figures: list[dict]) -> dict:
    errors = [f["error"] for f in figures if "error" in f]
    return {"error": errors[0]} if errors else {"s_per_step": statistics.median(f["s_per_step"] for f in figures)}


def print_table(results: dict[str, dict[str, dict]], baseline: str) -> None:
    print(f"{'setting':<20} {'this tree s/step':>16} {'x PPCE':>7} {baseline + ' s/step':>16} {'x PPCE':>7} "
          f"{'this / baseline':>15}")
    for setting in results["tree"]:
        row = [f"{setting:<20}"]
        for tree in ("tree", "baseline"):
            figure, ppce = results[tree][setting], results[tree].get("ppce", {})
            if "error" in figure:
                row += [f"{'n/a':>16}", f"{'':>7}"]
                continue
            ratio = figure["s_per_step"] / ppce["s_per_step"] if "s_per_step" in ppce else float("nan")
            row += [f"{figure['s_per_step']:16.3f}", f"{ratio:7.2f}"]
        ours, theirs = results["tree"][setting], results["baseline"][setting]
        both = "s_per_step" in ours and "s_per_step" in theirs
        row.append(f"{ours['s_per_step'] / theirs['s_per_step']:15.2f}" if both else f"{'n/a':>15}")
        print(" ".join(row))


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        trees = {"tree": REPO, "baseline": baseline_tree(args.baseline, Path(folder))}
        results = measure(args, trees)
    print_table(results, args.baseline)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "semeda_step.json").write_text(json.dumps({"baseline": args.baseline, "args": vars(args),
                                                      "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
