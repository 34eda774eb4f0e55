"""Parity of every zoo model's engines against its twin on CamVid val, at fp32, fp16 and int8.

For each architecture: a CamVid twin (a given checkpoint, or a short real training run so the label maps are
those of a model that has learnt something), exported through the gate (`export_onnx_gated`) with parity on
`--count` CamVid val images at `--size`. Writes `parity.json`, `parity.md` (the table) and `parity.png`
under `--out`; a precision that fails the gate is reported with its figures, not hidden.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from export.parity import ParityError  # noqa: E402
from export.pipeline import ParitySettings, export_onnx_gated, precision_path, read_parity  # noqa: E402
from segmenters.models import MODELS  # noqa: E402
from segmenters.training import TrainConfig, train  # noqa: E402

PRECISIONS = ("fp32", "fp16", "int8")


def twin_for(arch: str, given: dict[str, str], out: Path, steps: int, seed: int) -> Path:
    if arch in given:
        return Path(given[arch])
    run = out / "twins" / arch
    if not (run / "last.pt").is_file():
        config = TrainConfig(arch=arch, dataset="camvid", size=(180, 240), batch_size=8, max_steps=steps, epochs=100,
                             eval_every=1000, val_limit=8, compile=False, seed=seed, out=str(run))
        train(config, progress=False)
    return run / "last.pt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--archs", default=",".join(sorted(MODELS)))
    parser.add_argument("--checkpoint", action="append", default=[], help="ARCH=PATH: use this twin for ARCH")
    parser.add_argument("--steps", type=int, default=150, help="training steps for twins not given")
    parser.add_argument("--count", type=int, default=16, help="CamVid val images the gate runs on")
    parser.add_argument("--size", default="360x480", help="HEIGHTxWIDTH of the gate images (CamVid native)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/export")
    args = parser.parse_args()
    out = Path(args.out)
    given = dict(item.split("=", 1) for item in args.checkpoint)
    size = tuple(int(v) for v in args.size.split("x"))
    settings = ParitySettings(source="camvid", count=args.count, size=size, calibration_count=32)
    rows = []
    for arch in args.archs.split(","):
        checkpoint = twin_for(arch, given, out, args.steps, args.seed)
        started = time.perf_counter()
        try:
            export_onnx_gated(checkpoint, out / "engines" / f"{arch}.onnx", precisions=PRECISIONS, settings=settings,
                              progress=False)
        except ParityError as exc:
            print(f"{arch}: gate refused {exc.report.precision}")
        for precision in PRECISIONS:
            report = read_parity(precision_path(out / "engines" / f"{arch}.onnx", precision))
            rows.append({"arch": arch, "precision": precision, "passed": report.passed,
                         **report.model_dump(include={"max_abs", "median_abs", "max_abs_rel", "label_agreement",
                                                      "miou", "logit_range", "images", "pixels"})})
        print(f"{arch}: exported and gated in {time.perf_counter() - started:.0f}s", flush=True)
    (out / "parity.json").write_text(json.dumps(rows, indent=2))
    lines = ["| model | precision | max abs | / range | median abs | label agreement | mIoU vs twin | gate |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['precision']} | {r['max_abs']:.2e} | {r['max_abs_rel']:.2e} | "
                     f"{r['median_abs']:.2e} | {100 * r['label_agreement']:.4f}% | {r['miou']:.5f} | "
                     f"{'pass' if r['passed'] else 'FAIL'} |")
    table = "\n".join(lines)
    (out / "parity.md").write_text(table + "\n")
    print(table)
    plot(rows, out / "parity.png")


def plot(rows: list[dict], path: Path) -> None:
    archs = sorted({r["arch"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, key, title in ((axes[0], "label_agreement", "label agreement"), (axes[1], "miou", "mIoU vs twin")):
        for k, precision in enumerate(PRECISIONS):
            values = [next(r[key] for r in rows if r["arch"] == a and r["precision"] == precision) for a in archs]
            ax.bar([i + (k - 1) * 0.27 for i in range(len(archs))], values, width=0.27, label=precision)
        ax.set_xticks(range(len(archs)), archs, rotation=20, fontsize=8)
        ax.set_ylim(min(0.8, min(r[key] for r in rows) - 0.02), 1.001)
        ax.set_title(f"{title} (engine vs twin, CamVid val)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
