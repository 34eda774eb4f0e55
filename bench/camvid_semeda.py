"""PPCE vs SEMEDA (and optionally the Sobel baseline) on CamVid, the same model and budget for each.

Trains `--arch` (default LR-ASPP MobileNetV3-Large, from scratch) on CamVid train at `--size` with each loss,
same seed, epochs and schedule, then evaluates the final weights on CamVid val: mIoU, F1, E-measure and
boundary / non-boundary trimap mIoU. Prints a table with SEMEDA - PPCE differences and writes
`comparison.json`, `trimap.png` (thesis Fig. 3.5 style) and each run's eval folder under `--out`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from segmenters.data import build_dataset
from segmenters.evaluate import evaluate, plot_trimap
from segmenters.training import TrainConfig, train
from segmenters.twin import load_twin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="lraspp_mobilenetv3")
    parser.add_argument("--losses", default="ppce,semeda")
    parser.add_argument("--size", default="180x240", help="HEIGHTxWIDTH (half of CamVid's 360x480)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--lambdas", default="4,2,0", help="SEMEDA lambda_1..3 (Table 3.1 best for Cityscapes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", default="bench/results/camvid")
    parser.add_argument("--resume", action="store_true", help="continue runs found under --out")
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.split("x"))
    out = Path(args.out)
    val = build_dataset("camvid", "val", root=args.data_root, size=(height, width))
    reports, seconds = {}, {}
    for loss in args.losses.split(","):
        run = out / loss
        config = TrainConfig(
            arch=args.arch, dataset="camvid", data_root=args.data_root, loss=loss, size=(height, width),
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, out=str(run),
            lambdas=tuple(float(v) for v in args.lambdas.split(",")) if loss == "semeda" else None,
            eval_every=max(1, args.epochs // 6),
        )
        start = time.perf_counter()
        train(config, resume=args.resume and (run / "last.pt").is_file())
        seconds[loss] = round(time.perf_counter() - start, 1)
        # Same budget: compare the final weights, not the best-on-val ones.
        reports[loss] = evaluate(load_twin(run / "last.pt"), val, out_dir=run / "eval", overlays=6)

    plot_trimap(reports, out / "trimap.png")
    rows = ["miou", "mean_f1", "mean_e_measure", "pixel_accuracy"]
    table = {loss: {k: reports[loss][k] for k in rows} for loss in reports}
    for loss in reports:
        for row in reports[loss]["trimap"]:
            table[loss][f"boundary_miou@{row['band_width']}"] = row["boundary_miou"]
            table[loss][f"non_boundary_miou@{row['band_width']}"] = row["non_boundary_miou"]
    names = list(reports)
    print(f"{'metric':28s}" + "".join(f"{n:>10s}" for n in names) + ("   semeda-ppce" if {"ppce", "semeda"} <= set(names) else ""))
    for key in table[names[0]]:
        line = f"{key:28s}" + "".join(f"{100 * table[n][key]:10.2f}" for n in names)
        if {"ppce", "semeda"} <= set(names):
            line += f"{100 * (table['semeda'][key] - table['ppce'][key]):+14.2f}"
        print(line)
    result = {"arch": args.arch, "size": [height, width], "epochs": args.epochs, "batch_size": args.batch_size,
              "train_seconds": seconds, "metrics": table}
    (out / "comparison.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'comparison.json'} and {out / 'trimap.png'}")


if __name__ == "__main__":
    main()
