"""Campaign throughput: trials per minute with 1 vs 2 Ray workers (the scaling ratio), and attack iterations per
second per worker, on the same campaign in one run. Shapes U-Net at 128x128 (weights as initialised: the
cost of an attack step does not depend on training); each run gets a fresh local Ray cluster with `workers`
CPUs and a fresh store, so nothing is skipped. Writes scaling.json/.md under --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import yaml


#: the scene size of the shapes twin the campaign attacks
IMAGE_SIZE = (128, 128)
#: the campaign's two patch sizes (the trials per run are images x sizes)
PATCH_SIZES = [8, 16]
EOT_EVAL_DRAWS = 4
WORKER_COUNTS = (1, 2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials-per-run", type=int, default=8, help="images x sizes (2 sizes)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eot-samples", type=int, default=2)
    parser.add_argument("--out", default="bench/results/campaign_scaling")
    return parser.parse_args(argv)


def write_campaign(args: argparse.Namespace, out: Path) -> Path:
    """A shapes U-Net twin as initialised and the campaign that attacks it; the campaign file's path."""
    import torch

    from segmenters.data import dataset_classes
    from segmenters.models import build_model
    from segmenters.spec import ModelSpec
    from segmenters.twin import save_twin

    torch.manual_seed(0)
    spec = ModelSpec(arch="unet", classes=dataset_classes("shapes"), input_size=IMAGE_SIZE, dataset="shapes")
    twin = out / "shapes_unet.pt"
    save_twin(twin, build_model("unet", spec.num_classes), spec)
    campaign = out / "campaign.yaml"
    campaign.write_text(yaml.safe_dump({
        "name": "scaling", "models": [str(twin.resolve())],
        "images": {"dataset": "shapes", "split": "val", "count": args.trials_per_run // len(PATCH_SIZES)},
        "targets": [{"kind": "switch"}], "patch_sizes": PATCH_SIZES, "seeds": [0],
        "attack": {"steps": args.steps, "eot_samples": args.eot_samples}, "eot_eval_draws": EOT_EVAL_DRAWS}))
    return campaign


def measure(campaign: Path, run: Path, workers: int) -> dict:
    """One campaign on a fresh local cluster of `workers` CPUs and a fresh store: trials/min, iterations/s."""
    from audit.runner import run_campaign
    from audit.store import TrialStore

    shutil.rmtree(run, ignore_errors=True)
    started = time.perf_counter()
    summary = run_campaign(campaign, run, local_cpus=workers, num_cpus=1.0)
    wall = time.perf_counter() - started
    with TrialStore(run) as store:
        rows = store.rows()
    attack_seconds = sum(r["seconds"] for r in rows)
    steps = sum(r["metrics"]["steps"] for r in rows)
    return {"trials": summary["stored"], "wall_s": wall, "trials_per_min": 60 * summary["stored"] / wall,
            "iterations_per_s_per_worker": steps / attack_seconds, "mean_trial_s": attack_seconds / len(rows)}


def table(results: dict) -> str:
    lines = ["| Ray workers | trials | wall (s) | trials/min | attack iterations/s per worker |",
             "|---|---|---|---|---|"]
    for workers in WORKER_COUNTS:
        r = results[workers]
        lines.append(f"| {workers} | {r['trials']} | {r['wall_s']:.1f} | {r['trials_per_min']:.1f} | "
                     f"{r['iterations_per_s_per_worker']:.1f} |")
    lines.append(f"\nScaling 2 vs 1 workers: x{results['scaling_2_vs_1']:.2f} (wall time includes Ray start-up)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    campaign = write_campaign(args, out)
    results = {workers: measure(campaign, out / f"run_{workers}", workers) for workers in WORKER_COUNTS}
    results["scaling_2_vs_1"] = results[2]["trials_per_min"] / results[1]["trials_per_min"]
    (out / "scaling.json").write_text(json.dumps(results, indent=2))
    (out / "scaling.md").write_text(table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
