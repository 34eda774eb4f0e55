"""What bf16 autocast does to a training step on this machine, per architecture: fp32 is the baseline (issue 18,
item 3: which precision the CamVid runs of bench/camvid_archs.py should train in here).

Times `segmenters.training.training_throughput` (train()'s own step: model, PPCE, AdamW, precision, channels_last;
eager) at the fair plan's setting (180x240 crops, batch 8, CamVid's 11 classes) in fp32 and in bf16, alternating,
`--repeats` times each; the figure is the median s/step. Prints bf16's time over fp32's per arch, and whether the
device has bf16 hardware (segmenters.device.native_bf16: AMX or AVX512-BF16 on a CPU). Writes train_precision.json
under `--out`.

    python bench/train_precision.py                       # the three archs of bench/camvid_archs.py
    python bench/train_precision.py --archs lraspp_mobilenetv3 --steps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.camvid_archs import ARCHS  # noqa: E402
from bench.camvid_runs import FAIR_CROP, parse_size  # noqa: E402
from segmenters.data import dataset_classes  # noqa: E402
from segmenters.device import DEVICE_HELP, describe_device, native_bf16, resolve_device  # noqa: E402
from segmenters.training import training_throughput  # noqa: E402

PRECISIONS = ("off", "bf16")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default=ARCHS)
    parser.add_argument("--crop", default=FAIR_CROP, help="HEIGHTxWIDTH of a training crop")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu", help=DEVICE_HELP)
    parser.add_argument("--out", default="bench/results/train_precision")
    return parser.parse_args(argv)


def seconds_per_step(args: argparse.Namespace, arch: str, amp: str) -> float:
    result = training_throughput(arch, parse_size(args.crop), args.batch, args.device, amp=amp, steps=args.steps,
                                 warmup=args.warmup, classes=len(dataset_classes("camvid")), compile=False)
    return result["seconds"] / result["steps"]


def measure(args: argparse.Namespace) -> dict[str, dict]:
    results = {}
    for arch in args.archs.split(","):
        times = {amp: [] for amp in PRECISIONS}
        for _ in range(args.repeats):
            for amp in PRECISIONS:  # alternating, so a slow spell of the machine falls on both
                times[amp].append(seconds_per_step(args, arch, amp))
        median = {amp: statistics.median(values) for amp, values in times.items()}
        results[arch] = {"s_per_step": median, "bf16_over_fp32": median["bf16"] / median["off"], "runs": times}
        print(f"{arch:22s} fp32 {median['off']:7.3f} s/step   bf16 {median['bf16']:7.3f} s/step   "
              f"bf16/fp32 {results[arch]['bf16_over_fp32']:5.2f}x", flush=True)
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    print(f"device: {describe_device(device)}; bf16 in hardware: {native_bf16(device)}; "
          f"torch threads: {torch.get_num_threads()}")
    results = measure(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_precision.json").write_text(json.dumps(
        {"device": describe_device(device), "native_bf16": native_bf16(device), "threads": torch.get_num_threads(),
         "args": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
