"""What each way of reaching the service costs on top of the engine itself, per request (issue 17's fixed overhead).

One frame (`--size`, default 32x32, a U-Net with random weights: the engine's own time is small, so what is left is
the path's) segmented, labels back, over every path a client has, alternated for `--rounds` rounds with the cluster
up throughout: in process (`OnnxRuntimeEngine.segment`, the baseline), HTTP binary through Serve's proxy
(`serving.client.OipClient`, stock `tritonclient.http`), HTTP binary on the ingress's own port (`direct_port`: no
proxy hop), gRPC with raw tensors through stock `tritonclient.grpc`, and HTTP and gRPC with the frame and labels in
system shared memory (`tritonclient.utils.shared_memory`). Reports each path's p50 and p99 and its p50 minus in
process: the fixed overhead (goals: <= 8 ms HTTP binary, <= 5 ms gRPC or shared memory). Loopback only; the
cluster is stopped at the end.

    python bench/serve_paths.py [--requests 200] [--rounds 3]   # -> bench/results/serving/paths.json, paths.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() not in (REPO, REPO / "bench")]

GOALS_MS = {"http binary (OipClient)": 8.0, "http binary (tritonclient)": 8.0,
            "http binary, direct port (tritonclient)": 8.0, "grpc raw (tritonclient)": 5.0,
            "http shared memory (tritonclient)": 5.0, "http shared memory, direct port (tritonclient)": 5.0,
            "grpc shared memory (tritonclient)": 5.0}


def timed(call, requests: int) -> list[float]:
    times = []
    for _ in range(requests):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000.0)
    return times


def shared_memory_call(module, client, frame: np.ndarray, labels_bytes: int, stack, port: str = "proxy"):
    """tritonclient.http or .grpc (`module`, its `client` on `port`) with the frame read from one region and the
    labels written into another."""
    from tritonclient.utils import shared_memory as shm

    tag = f"{module.__name__.rsplit('.', 1)[-1]}-{port}"
    key = f"/patchwatch-bench-{os.getpid()}-{tag}"
    frames_region = shm.create_shared_memory_region(f"{tag}_frames", key + "-frames", frame.nbytes)
    labels_region = shm.create_shared_memory_region(f"{tag}_labels", key + "-labels", labels_bytes)
    stack.append(lambda: (client.unregister_system_shared_memory(f"{tag}_frames"),
                          client.unregister_system_shared_memory(f"{tag}_labels"),
                          shm.destroy_shared_memory_region(frames_region),
                          shm.destroy_shared_memory_region(labels_region)))
    shm.set_shared_memory_region(frames_region, [frame])
    client.register_system_shared_memory(f"{tag}_frames", key + "-frames", frame.nbytes)
    client.register_system_shared_memory(f"{tag}_labels", key + "-labels", labels_bytes)
    frames_input = module.InferInput("frames", list(frame.shape), "UINT8")
    frames_input.set_shared_memory(f"{tag}_frames", frame.nbytes)
    labels_output = module.InferRequestedOutput("labels")
    labels_output.set_shared_memory(f"{tag}_labels", labels_bytes)
    shape = list(frame.shape[:3])

    def call():
        client.infer("bench", [frames_input], outputs=[labels_output])
        return shm.get_contents_as_numpy(labels_region, np.uint8, shape)
    return call


def paths(service, engine, frame: np.ndarray, stack) -> dict:
    """Path name -> a call that segments `frame` and brings its labels back."""
    import tritonclient.grpc as tritongrpc
    import tritonclient.http as tritonhttp

    from serving.client import OipClient

    oip = OipClient(service.url)
    http = tritonhttp.InferenceServerClient(service.url.split("://", 1)[1])
    direct = tritonhttp.InferenceServerClient(service.direct_url.split("://", 1)[1])
    grpc = tritongrpc.InferenceServerClient(service.grpc_address)

    def triton(module, client):
        frames_input = module.InferInput("frames", list(frame.shape), "UINT8")
        frames_input.set_data_from_numpy(frame)
        outputs = [module.InferRequestedOutput("labels")]
        return lambda: client.infer("bench", [frames_input], outputs=outputs).as_numpy("labels")

    labels_bytes = engine.segment(frame).nbytes
    return {"in process": lambda: engine.segment(frame),
            "http binary (OipClient)": lambda: oip.infer("bench", {"frames": frame}, {"labels": True})["labels"],
            "http binary (tritonclient)": triton(tritonhttp, http),
            "http binary, direct port (tritonclient)": triton(tritonhttp, direct),
            "grpc raw (tritonclient)": triton(tritongrpc, grpc),
            "http shared memory (tritonclient)": shared_memory_call(tritonhttp, http, frame, labels_bytes, stack),
            "http shared memory, direct port (tritonclient)": shared_memory_call(tritonhttp, direct, frame,
                                                                                 labels_bytes, stack, "direct"),
            "grpc shared memory (tritonclient)": shared_memory_call(tritongrpc, grpc, frame, labels_bytes, stack)}


def summarise(samples: dict[str, list[float]]) -> dict:
    base = float(np.percentile(samples["in process"], 50))
    table = {}
    for name, times in samples.items():
        p50 = float(np.percentile(times, 50))
        table[name] = {"p50_ms": p50, "p99_ms": float(np.percentile(times, 99)), "overhead_p50_ms": p50 - base,
                       "goal_ms": GOALS_MS.get(name), "requests": len(times)}
    return table


def plot(table: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in table if n != "in process"]
    figure, axis = plt.subplots(figsize=(8, 3.5))
    axis.barh(names, [table[n]["overhead_p50_ms"] for n in names], color="tab:blue", label="p50 minus in process")
    for row, name in enumerate(names):
        axis.plot([table[name]["goal_ms"]] * 2, [row - 0.4, row + 0.4], color="red")
    axis.set_xlabel("fixed overhead per request, ms (red: goal)")
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="32x32")
    parser.add_argument("--requests", type=int, default=200, help="per path per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="bench/results/serving")
    args = parser.parse_args()
    from bench.serve_load import make_engine_file
    from export import OnnxRuntimeEngine
    from patchwatch.options import parse_size
    from serving.cluster import free_port, start_local
    from serving.config import ServeConfig

    size = parse_size(args.size)
    out = Path(args.out)
    engine_file = make_engine_file("unet", size, out / f"engines-{size[0]}x{size[1]}")
    engine = OnnxRuntimeEngine(str(engine_file), threads=1)
    frame = np.random.default_rng(0).integers(0, 256, (1, *size, 3), dtype=np.uint8)
    config = ServeConfig(models=[{"name": "bench", "path": str(engine_file.resolve()), "threads": 1,
                                  "batch_wait_ms": 0}], port=free_port(), grpc_port=free_port(),
                         direct_port=free_port())
    service, cleanup = start_local(config, metrics_port=free_port()), []
    try:
        calls = paths(service, engine, frame, cleanup)
        for name, call in calls.items():  # warm-up, and every path gives the same labels
            np.testing.assert_array_equal(call(), engine.segment(frame), err_msg=name)
        samples = {name: [] for name in calls}
        for _ in tqdm(range(args.rounds), desc=f"rounds ({len(calls)} paths)"):
            for name, call in calls.items():
                samples[name] += timed(call, args.requests)
    finally:
        for undo in cleanup:
            undo()
        service.stop()
    table = summarise(samples)
    out.mkdir(parents=True, exist_ok=True)
    (out / "paths.json").write_text(json.dumps({"size": list(size), "rounds": args.rounds, "table": table,
                                                "samples": samples, "load_1min": os.getloadavg()[0]}, indent=1))
    plot(table, out / "paths.png", f"one {size[0]}x{size[1]} frame, {args.rounds} x {args.requests} requests a path "
         f"(p50 in process {table['in process']['p50_ms']:.2f} ms)")
    for name, row in table.items():
        goal = "" if row["goal_ms"] is None else f" (goal <= {row['goal_ms']:.0f} ms: " \
            f"{'met' if row['overhead_p50_ms'] <= row['goal_ms'] else 'missed'})"
        print(f"{name:<36} p50 {row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:6.2f} ms  overhead "
              f"{row['overhead_p50_ms']:+6.2f} ms{goal}")
    print(f"median of per-path p50s: {statistics.median(r['p50_ms'] for r in table.values()):.2f} ms; wrote "
          f"{out / 'paths.json'} and {out / 'paths.png'}")


if __name__ == "__main__":
    main()
