"""Serving load test: what Ray Serve + the Open Inference Protocol add over calling the same ONNX Runtime
session in-process, at 360x480 on real CamVid frames.

Workload, identical on both sides: an RGB uint8 camera frame in, its label map out. In-process that is
`engine.segment(frames)` on an `OnnxRuntimeEngine` of the same file, with the same ONNX Runtime threads as the
replica's; served it is a request to a local Ray cluster on 127.0.0.1 over each path a client has: HTTP JSON and
HTTP binary through Serve's proxy, HTTP binary on the ingress's direct port, gRPC raw tensors, and gRPC with the
frame and labels in system shared memory (stock tritonclient where it applies).

  * latency, batch 1: sequential requests, p50 and p99, each path vs in-process;
  * throughput with batching: `--clients` concurrent clients, each its own client sending batch-1 requests
    (Serve's dynamic batching forms the engine batches), on the proxy, the direct port and gRPC, vs the
    in-process session called on batches of `--batch` frames.

The two sides alternate for `--rounds` rounds in one run, with the cluster up throughout (its background work
loads both sides alike), and the ratios are what to read: this machine is shared and noisy. Bounded in requests
and time; loopback only; the cluster is stopped at the end. Writes serving.json/.md/.png under `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
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


#: the ways a client reaches the service, each a factory of one client's call (frames -> labels)
PATHS = ("http json (proxy)", "http binary (proxy)", "http binary (direct port)", "grpc raw", "grpc shared memory")
#: the paths whose throughput under concurrent clients is measured: the load-balanced one and the two fast ones
THROUGHPUT_PATHS = ("http binary (proxy)", "http binary (direct port)", "grpc raw")
#: issue 17's goals, for the fastest path: p50 overhead over in process, and batched throughput against it
P50_OVERHEAD_GOAL, THROUGHPUT_GOAL = 0.25, 0.8


def sequential(call, frames: np.ndarray, requests: int) -> list[float]:
    times = []
    for i in range(requests):
        start = time.perf_counter()
        call(frames[i % len(frames)][None])
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def concurrent(make_call, frames: np.ndarray, clients: int, per_client: int) -> tuple[float, list[float]]:
    """`clients` threads, each with its own client (`make_call()`) sending `per_client` batch-1 requests;
    -> (images/s, latencies ms)."""
    latencies: list[float] = []
    lock = threading.Lock()
    calls = [make_call() for _ in range(clients)]

    def client(offset: int) -> None:
        for i in range(per_client):
            start = time.perf_counter()
            calls[offset](frames[(offset + i) % len(frames)][None])
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


def _triton_call(module, address: str):
    client = module.InferenceServerClient(address)
    outputs = [module.InferRequestedOutput("labels")]

    def call(batch: np.ndarray) -> np.ndarray:
        frames = module.InferInput("frames", list(batch.shape), "UINT8")
        frames.set_data_from_numpy(batch)
        return client.infer("bench", [frames], outputs=outputs).as_numpy("labels")
    return call


def _shared_memory_call(address: str, frame_shape: tuple[int, ...], cleanup: list):
    """tritonclient.grpc with each frame copied into a region of this node and its labels written into another."""
    import tritonclient.grpc as tritongrpc
    from tritonclient.utils import shared_memory as shm

    client = tritongrpc.InferenceServerClient(address)
    tag = f"load{len(cleanup)}"
    key = f"/patchwatch-serve-load-{os.getpid()}-{tag}"
    frame_bytes, label_bytes = int(np.prod(frame_shape)), int(np.prod(frame_shape[:3]))
    regions = [shm.create_shared_memory_region(f"{tag}-{kind}", f"{key}-{kind}", size)
               for kind, size in (("frames", frame_bytes), ("labels", label_bytes))]
    cleanup.append(lambda: (client.unregister_system_shared_memory(),
                            [shm.destroy_shared_memory_region(region) for region in regions]))
    for kind, size in (("frames", frame_bytes), ("labels", label_bytes)):
        client.register_system_shared_memory(f"{tag}-{kind}", f"{key}-{kind}", size)
    frames = tritongrpc.InferInput("frames", list(frame_shape), "UINT8")
    frames.set_shared_memory(f"{tag}-frames", frame_bytes)
    labels = tritongrpc.InferRequestedOutput("labels")
    labels.set_shared_memory(f"{tag}-labels", label_bytes)

    def call(batch: np.ndarray) -> np.ndarray:
        shm.set_shared_memory_region(regions[0], [np.ascontiguousarray(batch)])
        client.infer("bench", [frames], outputs=[labels])
        return shm.get_contents_as_numpy(regions[1], np.uint8, list(frame_shape[:3]))
    return call


def path_factories(service, frame_shape: tuple[int, ...], cleanup: list) -> dict:
    """Path name -> a factory of one client's call on that path (frames -> labels)."""
    import tritonclient.grpc as tritongrpc
    import tritonclient.http as tritonhttp

    from serving.client import OipClient

    def oip(binary: bool):
        client = OipClient(service.url)
        return lambda batch: client.infer("bench", {"frames": batch}, {"labels": binary}, binary=binary)["labels"]

    return {"http json (proxy)": lambda: oip(False), "http binary (proxy)": lambda: oip(True),
            "http binary (direct port)": lambda: _triton_call(tritonhttp, service.direct_url.split("://", 1)[1]),
            "grpc raw": lambda: _triton_call(tritongrpc, service.grpc_address),
            "grpc shared memory": lambda: _shared_memory_call(service.grpc_address, frame_shape, cleanup)}


def measure(args, local, service, frames: np.ndarray) -> dict:
    """Alternating rounds: in process, then every path sequentially, then concurrent clients on each throughput
    path against the in-process batched run."""
    from tqdm import tqdm

    cleanup: list = []
    results = {"local_seq": [], "local_batched_tput": [], **{f"seq {p}": [] for p in PATHS},
               **{f"tput {p}": [] for p in THROUGHPUT_PATHS}, **{f"conc {p}": [] for p in THROUGHPUT_PATHS}}
    try:
        factories = path_factories(service, (1, *frames.shape[1:]), cleanup)
        calls = {name: factory() for name, factory in factories.items()}
        expected = local.segment(frames[:1])
        for name, call in calls.items():  # same answers on every path, or no bench; and a warm-up
            np.testing.assert_array_equal(call(frames[:1]), expected, err_msg=name)
            sequential(call, frames, 3)
        for _ in tqdm(range(args.rounds), desc="serving bench rounds"):
            results["local_seq"] += sequential(local.segment, frames, args.requests)
            for name, call in calls.items():
                results[f"seq {name}"] += sequential(call, frames, args.requests)
            results["local_batched_tput"].append(batched_in_process(local, frames, args.batch,
                                                                    args.clients * args.per_client))
            for name in THROUGHPUT_PATHS:
                throughput, latencies = concurrent(factories[name], frames, args.clients, args.per_client)
                results[f"tput {name}"].append(throughput)
                results[f"conc {name}"] += latencies
    finally:
        for undo in cleanup:
            undo()
    return results


def summarise(args, size, local, results: dict) -> dict:
    local_p50 = percentile(results["local_seq"], 50)
    batched = statistics.median(results["local_batched_tput"])
    paths = {}
    for name in PATHS:
        p50 = percentile(results[f"seq {name}"], 50)
        row = {"p50_ms": p50, "p99_ms": percentile(results[f"seq {name}"], 99), "p50_overhead": p50 / local_p50 - 1}
        if name in THROUGHPUT_PATHS:
            row.update(concurrent_ips=statistics.median(results[f"tput {name}"]),
                       throughput_ratio=statistics.median(results[f"tput {name}"]) / batched,
                       concurrent_p50_ms=percentile(results[f"conc {name}"], 50),
                       concurrent_p99_ms=percentile(results[f"conc {name}"], 99))
        paths[name] = row
    fastest = min(paths, key=lambda n: paths[n]["p50_ms"])
    best_throughput = max(THROUGHPUT_PATHS, key=lambda n: paths[n]["throughput_ratio"])
    return {"arch": args.arch, "size": list(size), "rounds": args.rounds, "clients": args.clients,
            "batch": args.batch, "batch_wait_ms": args.batch_wait_ms, "threads": args.threads,
            "backend": local.backend, "in_process_p50_ms": local_p50,
            "in_process_p99_ms": percentile(results["local_seq"], 99), "in_process_batched_ips": batched,
            "in_process_batch1_ips": 1000.0 / local_p50, "paths": paths, "fastest_path": fastest,
            "best_throughput_path": best_throughput,
            "goals": {f"p50_overhead <= {P50_OVERHEAD_GOAL} ({fastest})":
                      paths[fastest]["p50_overhead"] <= P50_OVERHEAD_GOAL,
                      f"throughput_ratio >= {THROUGHPUT_GOAL} ({best_throughput})":
                      paths[best_throughput]["throughput_ratio"] >= THROUGHPUT_GOAL}}


def report(summary: dict) -> list[str]:
    lines = [f"# Serving vs in-process ONNX Runtime: {summary['arch']} at {summary['size'][0]}x{summary['size'][1]}, "
             f"{summary['rounds']} rounds, {summary['threads']} ONNX Runtime threads both sides", "",
             f"In process: batch-1 p50 {summary['in_process_p50_ms']:.1f} ms, p99 {summary['in_process_p99_ms']:.1f} "
             f"ms; batch {summary['batch']}: {summary['in_process_batched_ips']:.2f} images/s.", "",
             f"| path | batch-1 p50 (ms) | p99 (ms) | p50 overhead | {summary['clients']} clients: images/s "
             "| ratio to in-process batched | p50 / p99 under load (ms) |", "|---|---|---|---|---|---|---|"]
    for name, row in summary["paths"].items():
        load = (f"{row['concurrent_ips']:.2f} | {row['throughput_ratio']:.3f} | {row['concurrent_p50_ms']:.0f} / "
                f"{row['concurrent_p99_ms']:.0f}") if "concurrent_ips" in row else " | | "
        lines.append(f"| {name} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {100 * row['p50_overhead']:+.1f} % | "
                     f"{load} |")
    lines.append("")
    lines += [f"Goal {goal}: **{'met' if met else 'missed'}**" for goal, met in summary["goals"].items()]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="lraspp_mobilenetv3")
    parser.add_argument("--size", default="360x480")
    parser.add_argument("--requests", type=int, default=40, help="sequential requests per path per round")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=6, help="requests per concurrent client per round")
    parser.add_argument("--batch", type=int, default=8, help="in-process batch and the served max batch size")
    parser.add_argument("--batch-wait-ms", type=float, default=0.0, help="the served model's batch wait")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="ONNX Runtime threads, both sides (default: the machine's cores)")
    parser.add_argument("--out", default="bench/results/serving")
    args = parser.parse_args()
    from export import OnnxRuntimeEngine
    from patchwatch.options import parse_size
    from serving.cluster import free_port, start_local
    from serving.config import ServeConfig

    size = parse_size(args.size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    engine_file = make_engine_file(args.arch, size, out / "models")
    frames = camvid_frames(8, size)
    local = OnnxRuntimeEngine(engine_file, threads=args.threads)
    config = ServeConfig(models=[{"name": "bench", "path": str(engine_file.resolve()), "max_batch_size": args.batch,
                                  "batch_wait_ms": args.batch_wait_ms, "threads": args.threads,
                                  "max_ongoing_requests": 4 * args.batch}],
                         port=free_port(), grpc_port=free_port(), direct_port=free_port())
    service = start_local(config, metrics_port=free_port())
    try:
        results = measure(args, local, service, frames)
    finally:
        service.stop()
    summary = summarise(args, size, local, results)
    (out / "serving.json").write_text(json.dumps({"summary": summary, "samples": results}, indent=2))
    lines = report(summary)
    (out / "serving.md").write_text("\n".join(lines) + "\n")
    plot(results, summary, out / "serving.png")
    print("\n".join(lines))


def plot(results: dict, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, label in [("local_seq", "in process")] + [(f"seq {p}", p) for p in PATHS]:
        values = np.sort(results[key])
        left.plot(values, np.linspace(0, 1, len(values)), label=label)
    left.set_xlabel("batch-1 latency (ms)")
    left.set_ylabel("fraction of requests")
    left.set_title("latency CDF, one request at a time")
    left.legend(fontsize=7)
    names = [f"in process\nbatch {summary['batch']}"] + [p.replace(" (", "\n(") for p in THROUGHPUT_PATHS]
    bars = [summary["in_process_batched_ips"]] + [summary["paths"][p]["concurrent_ips"] for p in THROUGHPUT_PATHS]
    right.bar(names, bars, color=["#444"] + ["#1f77b4"] * len(THROUGHPUT_PATHS))
    right.axhline(THROUGHPUT_GOAL * summary["in_process_batched_ips"], color="red", lw=1, label="goal 0.8x")
    right.set_ylabel("images / s")
    right.set_title(f"throughput, {summary['clients']} concurrent clients")
    right.legend(fontsize=7)
    figure.suptitle(f"{summary['arch']} {summary['size'][0]}x{summary['size'][1]}: serving vs in process")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
