"""Engine benchmark: PyTorch eager vs ONNX Runtime (CPU), per zoo model, at 360x480 and 512x1024, batch 1 and 8.

`--calls` picks what is timed: `infer` (normalised images -> logits, the default and the figures earlier runs
report), `labels` (what callers did before `Engine.segment`: `labels(prepare(frames))`, the logits on the host)
and `segment` (uint8 frames -> labels). With labels and segment a second table compares the two: latency and
the host memory each uses per frame (peak resident growth over the loaded engine, divided by the batch).

Each (model, backend, size, batch) cell runs in its own process so its peak memory is its own: the figure is
the process's peak resident set during inference, and the growth over the resident set after loading. Both
backends use the same threads. Latency is the median over `--repeats` timed calls after a warm-up call;
throughput is images per second at that median. The ratios (ONNX Runtime over PyTorch, same run, same
machine) are what to read: this machine is shared and noisy, the absolute numbers less so.
Writes `engines.json`, `engines.md` and `engines.png` under `--out`.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = ((360, 480), (512, 1024))
BATCHES = (1, 8)


def measure(args: argparse.Namespace) -> None:
    """Child process: load one engine, time it, print one JSON line."""
    import numpy as np
    import psutil
    import torch

    torch.set_num_threads(args.threads)
    from export import OnnxRuntimeEngine, TorchEngine
    from segmenters.twin import load_twin

    engine = (TorchEngine(load_twin(args.checkpoint)) if args.backend == "torch"
              else OnnxRuntimeEngine(args.onnx, threads=args.threads, device="cpu"))
    height, width = args.size
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, 3, height, width)).astype(np.float32)
    frames = rng.integers(0, 256, (args.batch, height, width, 3), dtype=np.uint8)
    call = {"infer": lambda: engine.infer(x), "labels": lambda: engine.labels(engine.prepare(frames)),
            "segment": lambda: engine.segment(frames)}[args.call]
    loaded_rss = psutil.Process().memory_info().rss
    call()  # warm-up: allocations, kernel selection
    times, deadline = [], time.perf_counter() + args.budget
    while len(times) < args.repeats and (len(times) < 2 or time.perf_counter() < deadline):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    latency = statistics.median(times)
    print(json.dumps({"latency_ms": 1000 * latency, "throughput": args.batch / latency, "calls": len(times),
                      "peak_rss_mb": peak / 2**20, "peak_growth_mb": (peak - loaded_rss) / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--archs", default=None, help="comma-separated (default: the whole zoo)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of timed calls per cell (at least 2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--classes", type=int, default=19, help="Cityscapes-sized label set")
    parser.add_argument("--calls", default="infer", help="comma-separated: infer, labels, segment")
    parser.add_argument("--sizes", default=None, help="comma-separated HxW (default 360x480,512x1024)")
    parser.add_argument("--batches", default=None, help="comma-separated (default 1,8)")
    parser.add_argument("--out", default="bench/results/engines")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--onnx", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=lambda s: tuple(int(v) for v in s.split("x")), help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--call", default="infer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure(args)
        return

    out = Path(args.out)
    rows = run_cells(benchmark_cells(args, out), args)
    (out / "engines.json").write_text(json.dumps(rows, indent=2))
    table = "\n\n".join(t for t in (summarise([r for r in rows if r["call"] == "infer"]),
                                      segment_table(rows)) if t)
    (out / "engines.md").write_text(table + "\n")
    print(table)
    if any(r["call"] == "infer" for r in rows):
        plot([r for r in rows if r["call"] == "infer"], out / "engines.png")


def benchmark_cells(args: argparse.Namespace, out: Path) -> list[tuple]:
    """Every (arch, size, batch, backend, call, checkpoint, onnx) to time; seeded models written once under `out`
    (speed does not depend on what the weights learnt)."""
    import torch

    from export import export_onnx
    from segmenters.models import MODELS, build_model
    from segmenters.spec import ClassInfo, ModelSpec
    from segmenters.twin import load_twin, save_twin

    (out / "models").mkdir(parents=True, exist_ok=True)
    archs = args.archs.split(",") if args.archs else sorted(MODELS)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")] if args.sizes else SIZES
    batches = [int(b) for b in args.batches.split(",")] if args.batches else BATCHES
    classes = tuple(ClassInfo(name=f"class{i}", color=(i * 13 % 256, i * 71 % 256, i * 151 % 256))
                    for i in range(args.classes))
    cells = []
    for arch in archs:
        checkpoint, onnx_path = out / "models" / f"{arch}.pt", out / "models" / f"{arch}.onnx"
        if not onnx_path.is_file():
            torch.manual_seed(0)
            spec = ModelSpec(arch=arch, classes=classes, input_size=SIZES[0], dataset="benchmark")
            save_twin(checkpoint, build_model(arch, len(classes)), spec)
            export_onnx(load_twin(checkpoint), onnx_path)
        cells += [(arch, size, batch, backend, call, checkpoint, onnx_path) for size in sizes for batch in batches
                  for backend in ("torch", "onnxruntime") for call in args.calls.split(",")]
    return cells


def run_cells(cells: list[tuple], args: argparse.Namespace) -> list[dict]:
    """Each cell in a process of its own (its peak memory is its own); one result row per cell."""
    from tqdm import tqdm

    rows = []
    for arch, size, batch, backend, call, checkpoint, onnx_path in tqdm(cells, desc="engine cells"):
        command = [sys.executable, __file__, "--child", "--backend", backend, "--checkpoint", str(checkpoint),
                   "--onnx", str(onnx_path), "--size", f"{size[0]}x{size[1]}", "--batch", str(batch),
                   "--repeats", str(args.repeats), "--budget", str(args.budget), "--threads", str(args.threads),
                   "--call", call]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{arch} {backend} {call} {size} b{batch} failed:\n{done.stderr[-2000:]}")
        rows.append({"arch": arch, "size": f"{size[0]}x{size[1]}", "batch": batch, "backend": backend, "call": call,
                     **json.loads(done.stdout.strip().splitlines()[-1])})
    return rows


def segment_table(rows: list[dict]) -> str:
    """labels(prepare(frames)) against segment(frames), per backend: latency and host MB per frame."""
    found = {(r["arch"], r["size"], r["batch"], r["backend"], r["call"]): r for r in rows}
    keys = sorted({k[:4] for k in found if (*k[:4], "labels") in found and (*k[:4], "segment") in found})
    if not keys:
        return ""
    lines = ["| model | size | batch | backend | labels(prepare()) ms | segment ms | segment/labels latency | "
             "host MB/frame labels(prepare()) | host MB/frame segment |", "|---|---|---|---|---|---|---|---|---|"]
    for key in keys:
        old, new = found[(*key, "labels")], found[(*key, "segment")]
        per_frame = lambda r: r["peak_growth_mb"] / r["batch"]  # noqa: E731
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {old['latency_ms']:.0f} | {new['latency_ms']:.0f}"
                     f" | {new['latency_ms'] / old['latency_ms']:.2f} | {per_frame(old):.1f} | {per_frame(new):.1f} |")
    return "\n".join(lines)


def summarise(rows: list[dict]) -> str:
    if not rows:
        return ""
    lines = ["| model | size | batch | torch ms | ORT ms | ORT/torch latency | torch img/s | ORT img/s | "
             "ORT/torch throughput | torch peak MB (+growth) | ORT peak MB (+growth) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["arch"], r["size"], r["batch"]) for r in rows}, key=lambda k: (k[0], k[1] != "360x480", k[2]))
    for arch, size, batch in keys:
        t = next(r for r in rows if (r["arch"], r["size"], r["batch"], r["backend"]) == (arch, size, batch, "torch"))
        o = next(r for r in rows if (r["arch"], r["size"], r["batch"], r["backend"]) == (arch, size, batch,
                                                                                       "onnxruntime"))
        lines.append(
            f"| {arch} | {size} | {batch} | {t['latency_ms']:.0f} | {o['latency_ms']:.0f} | "
            f"{o['latency_ms'] / t['latency_ms']:.2f} | {t['throughput']:.2f} | {o['throughput']:.2f} | "
            f"{o['throughput'] / t['throughput']:.2f} | {t['peak_rss_mb']:.0f} (+{t['peak_growth_mb']:.0f}) | "
            f"{o['peak_rss_mb']:.0f} (+{o['peak_growth_mb']:.0f}) |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["arch"], r["size"], r["batch"]) for r in rows})
    speedup = []
    for key in keys:
        t = next(r for r in rows if (r["arch"], r["size"], r["batch"]) == key and r["backend"] == "torch")
        o = next(r for r in rows if (r["arch"], r["size"], r["batch"]) == key and r["backend"] == "onnxruntime")
        speedup.append(o["throughput"] / t["throughput"])
    fig, ax = plt.subplots(figsize=(12, 4))
    ax.bar(range(len(keys)), speedup, color=["C0" if k[2] == 1 else "C1" for k in keys])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(keys)), [f"{a}\n{s} b{b}" for a, s, b in keys], rotation=60, fontsize=6)
    ax.set_ylabel("ONNX Runtime / PyTorch throughput")
    ax.set_title("CPU throughput ratio (same run, same threads); blue batch 1, orange batch 8")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
