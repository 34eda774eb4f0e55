"""Serving load test: what Ray Serve + the Open Inference Protocol add over calling the same ONNX Runtime
session in-process, at 360x480 on real CamVid frames.

Workload, identical on both sides: an RGB uint8 camera frame in, its label map out. In-process that is
`engine.segment(frames)` on an `OnnxRuntimeEngine` of the same file; served it is an HTTP request
with the binary tensor extension (`frames` UINT8 in, `labels` UINT8 out) to a local Ray cluster on 127.0.0.1.

  * latency, batch 1: sequential requests, p50 and p99, served vs in-process;
  * throughput with batching: `--clients` concurrent clients each sending batch-1 requests (Serve's dynamic
    batching forms the engine batches) vs the in-process session called on batches of `--batch` frames.

The two sides alternate for `--rounds` rounds in one run, with the cluster up throughout (its background work
loads both sides alike), and the ratios are what to read: this machine is shared and noisy. Bounded in requests
and time; loopback only; the cluster is stopped at the end. Writes serving.json/.md/.png under `--out`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import numpy as np


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def make_engine_file(arch: str, size: tuple[int, int], folder: Path) -> Path:
    """An ONNX graph of `arch` (weights as initialised: timing does not depend on training), cached."""
    path = folder / f"{arch}.onnx"
    if path.exists():
        return path
    import torch

    from export import export_onnx
    from segmenters.data import dataset_classes
    from segmenters.models import build_model
    from segmenters.spec import ModelSpec
    from segmenters.twin import load_twin, save_twin

    torch.manual_seed(0)
    spec = ModelSpec(arch=arch, classes=dataset_classes("camvid"), input_size=size, dataset="camvid")
    folder.mkdir(parents=True, exist_ok=True)
    save_twin(folder / f"{arch}.pt", build_model(arch, spec.num_classes), spec)
    export_onnx(load_twin(folder / f"{arch}.pt"), path)
    return path


def camvid_frames(count: int, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    from segmenters.data import default_data_root
    from segmenters.data.frames import decode_image

    files = sorted((default_data_root() / "camvid" / "val").glob("*.png"))[:count]
    if not files:
        raise SystemExit(f"no CamVid frames under {default_data_root()}/camvid/val")
    frames = [decode_image(f.read_bytes()) for f in files]
    return np.stack([f if f.shape[:2] == size else np.asarray(Image.fromarray(f).resize(size[::-1])) for f in frames])


def sequential(call, frames: np.ndarray, requests: int) -> list[float]:
    times = []
    for i in range(requests):
        start = time.perf_counter()
        call(frames[i % len(frames)][None])
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def concurrent(call, frames: np.ndarray, clients: int, per_client: int) -> tuple[float, list[float]]:
    """`clients` threads, each sending `per_client` batch-1 requests; -> (images/s, latencies ms)."""
    latencies: list[float] = []
    lock = threading.Lock()

    def client(offset: int) -> None:
        for i in range(per_client):
            start = time.perf_counter()
            call(frames[(offset + i) % len(frames)][None])
            with lock:
                latencies.append((time.perf_counter() - start) * 1000.0)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return clients * per_client / (time.perf_counter() - start), latencies


def batched_in_process(engine, frames: np.ndarray, batch: int, images: int) -> float:
    stack = np.stack([frames[i % len(frames)] for i in range(batch)])
    start, done = time.perf_counter(), 0
    while done < images:
        engine.segment(stack)
        done += batch
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="lraspp_mobilenetv3")
    parser.add_argument("--size", default="360x480")
    parser.add_argument("--requests", type=int, default=40, help="sequential requests per round")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=6, help="requests per concurrent client per round")
    parser.add_argument("--batch", type=int, default=8, help="in-process batch and the served max batch size")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads, both sides (default: ORT's)")
    parser.add_argument("--out", default="bench/results/serving")
    args = parser.parse_args()
    from tqdm import tqdm

    from export import OnnxRuntimeEngine
    from patchwatch.options import parse_size
    from serving.client import OipClient
    from serving.cluster import free_port, start_local
    from serving.config import ServeConfig

    size = parse_size(args.size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    engine_file = make_engine_file(args.arch, size, out / "models")
    frames = camvid_frames(8, size)
    local = OnnxRuntimeEngine(engine_file, threads=args.threads)

    def in_process(batch):
        return local.segment(batch)

    config = ServeConfig(models=[{"name": "bench", "path": str(engine_file.resolve()), "max_batch_size": args.batch,
                                  "batch_wait_ms": args.batch_wait_ms, "threads": args.threads,
                                  "max_ongoing_requests": 4 * args.batch}], port=free_port())
    service = start_local(config, metrics_port=free_port())
    client = OipClient(service.url)

    def served(batch):
        return client.infer("bench", {"frames": batch}, {"labels": True})["labels"]

    results = {"local_seq": [], "served_seq": [], "local_batched_tput": [], "served_conc_tput": [],
               "served_conc_latency": [], "served_json_seq": []}
    try:
        np.testing.assert_array_equal(served(frames[:1]), in_process(frames[:1]))  # same answers, or no bench
        for call in (in_process, served):  # warm-up
            sequential(call, frames, 3)
        for _ in tqdm(range(args.rounds), desc="serving bench rounds"):
            results["local_seq"] += sequential(in_process, frames, args.requests)
            results["served_seq"] += sequential(served, frames, args.requests)
            results["local_batched_tput"].append(batched_in_process(local, frames, args.batch,
                                                                    args.clients * args.per_client))
            throughput, latencies = concurrent(served, frames, args.clients, args.per_client)
            results["served_conc_tput"].append(throughput)
            results["served_conc_latency"] += latencies
            results["served_json_seq"] += sequential(
                lambda b: client.infer("bench", {"frames": b}, {"labels": False}, binary=False), frames, 5)
    finally:
        service.stop()

    local_p50, served_p50 = percentile(results["local_seq"], 50), percentile(results["served_seq"], 50)
    summary = {
        "arch": args.arch, "size": list(size), "rounds": args.rounds, "clients": args.clients, "batch": args.batch,
        "batch_wait_ms": args.batch_wait_ms, "backend": local.backend,
        "in_process_p50_ms": local_p50, "in_process_p99_ms": percentile(results["local_seq"], 99),
        "served_p50_ms": served_p50, "served_p99_ms": percentile(results["served_seq"], 99),
        "served_json_p50_ms": percentile(results["served_json_seq"], 50),
        "p50_overhead": served_p50 / local_p50 - 1.0,
        "p99_ratio": percentile(results["served_seq"], 99) / percentile(results["local_seq"], 99),
        "in_process_batched_ips": statistics.median(results["local_batched_tput"]),
        "in_process_batch1_ips": 1000.0 / local_p50,
        "served_concurrent_ips": statistics.median(results["served_conc_tput"]),
        "served_concurrent_p50_ms": percentile(results["served_conc_latency"], 50),
        "served_concurrent_p99_ms": percentile(results["served_conc_latency"], 99),
    }
    summary["throughput_ratio"] = summary["served_concurrent_ips"] / summary["in_process_batched_ips"]
    summary["goals"] = {"p50_overhead <= 0.15": summary["p50_overhead"] <= 0.15,
                        "throughput_ratio >= 0.8": summary["throughput_ratio"] >= 0.8}
    (out / "serving.json").write_text(json.dumps({"summary": summary, "samples": results}, indent=2))
    lines = [
        f"# Serving vs in-process ONNX Runtime: {args.arch} at {size[0]}x{size[1]}, {args.rounds} rounds",
        "",
        "| measure | in-process | served (OIP binary) | ratio |",
        "|---|---|---|---|",
        f"| batch-1 p50 latency (ms) | {local_p50:.1f} | {served_p50:.1f} | {served_p50 / local_p50:.3f} "
        f"(+{100 * summary['p50_overhead']:.1f} %) |",
        f"| batch-1 p99 latency (ms) | {summary['in_process_p99_ms']:.1f} | {summary['served_p99_ms']:.1f} | "
        f"{summary['p99_ratio']:.3f} |",
        f"| throughput (images/s): in-process batch {args.batch} vs {args.clients} concurrent clients | "
        f"{summary['in_process_batched_ips']:.2f} | {summary['served_concurrent_ips']:.2f} | "
        f"{summary['throughput_ratio']:.3f} |",
        f"| served latency under concurrency p50 / p99 (ms) | | {summary['served_concurrent_p50_ms']:.0f} / "
        f"{summary['served_concurrent_p99_ms']:.0f} | |",
        f"| batch-1 p50, JSON labels instead of binary (ms) | | {summary['served_json_p50_ms']:.1f} | |",
        "",
        f"Goals: serving adds <= 15 % to p50: **{'met' if summary['goals']['p50_overhead <= 0.15'] else 'missed'}**;"
        f" batched throughput >= 0.8x in-process: "
        f"**{'met' if summary['goals']['throughput_ratio >= 0.8'] else 'missed'}**.",
    ]
    (out / "serving.md").write_text("\n".join(lines) + "\n")
    plot(results, summary, out / "serving.png")
    print("\n".join(lines))


def plot(results: dict, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("local_seq", "in-process"), ("served_seq", "served, batch 1"),
                       ("served_conc_latency", f"served, {summary['clients']} clients")):
        values = np.sort(results[key])
        left.plot(values, np.linspace(0, 1, len(values)), label=label)
    left.set_xlabel("latency (ms)")
    left.set_ylabel("fraction of requests")
    left.set_title("latency CDF")
    left.legend()
    bars = [summary["in_process_batch1_ips"], summary["in_process_batched_ips"], summary["served_concurrent_ips"]]
    right.bar(["in-process\nbatch 1", f"in-process\nbatch {summary['batch']}", f"served\n{summary['clients']} clients"],
              bars, color=["#888", "#444", "#1f77b4"])
    right.set_ylabel("images / s")
    right.set_title(f"throughput (ratio {summary['throughput_ratio']:.2f})")
    figure.suptitle(f"{summary['arch']} {summary['size'][0]}x{summary['size'][1]}: serving vs in-process")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
