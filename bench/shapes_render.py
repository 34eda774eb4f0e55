"""Is the shapes renderer fast enough to generate training data on the fly?

Measures renderer images/s (one process) at 128x128 and 480x320, and, as the baseline in the same run, the
images/s that one U-Net training step consumes at the same size. A ratio >= 1 means one core renders as fast
as training eats; `--workers` > 1 also times the parallel cache warm-up used by `patchwatch train`.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from segmenters.data.shapes import ShapesConfig, ShapesDataset, render_sample
from segmenters.models import build_model


def render_rate(height: int, width: int, count: int) -> float:
    config = ShapesConfig(height=height, width=width)
    render_sample(0, "train", 0, config)  # warm caches and imports
    start = time.perf_counter()
    for index in range(1, count + 1):
        render_sample(0, "train", index, config)
    return count / (time.perf_counter() - start)


def training_rate(height: int, width: int, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    model = build_model("unet", 4).train()
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.rand(batch, 3, height, width)
    y = torch.randint(0, 4, (batch, height, width))
    for _ in range(2):  # warm-up
        F.cross_entropy(model(x), y).backward()
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=60, help="images rendered per size")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    results = {"torch_threads": torch.get_num_threads()}
    for height, width in ((128, 128), (320, 480)):
        count = args.count if height == 128 else max(6, args.count // 8)
        render = render_rate(height, width, count)
        trained = training_rate(height, width, batch=16 if height == 128 else 4, steps=5)
        results[f"{height}x{width}"] = {
            "render_images_per_s": round(render, 2),
            "unet_train_images_per_s": round(trained, 2),
            "render_over_training_ratio": round(render / trained, 2),
        }
    if args.workers > 1:
        dataset = ShapesDataset("train", length=max(1200, args.count * 10), cache=True)  # amortise spawn start-up
        start = time.perf_counter()
        dataset.warm(workers=args.workers, progress=False)
        parallel = dataset.length / (time.perf_counter() - start)
        results["128x128"][f"warm_cache_{args.workers}_workers_images_per_s"] = round(parallel, 2)
        results["128x128"]["parallel_over_single_ratio"] = round(parallel / results["128x128"]["render_images_per_s"], 2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
