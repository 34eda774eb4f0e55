"""Fuzz the served Open Inference Protocol endpoint and watch the service's memory (issue 17).

A real local Ray cluster and Ray Serve on 127.0.0.1 serve a small U-Net (random weights: what is measured is the
front door, not the model). After `--warmup` good requests the service's resident memory (HTTP proxy, ingress and
model replicas, summed) is the baseline; then `--requests` malformed requests (`serving.fuzzing`: mutated JSON
fields, cut-off or lying binary parts, compressed garbage, wrong content types, shared-memory parameters naming
nothing) go in from `--clients` threads, with a good request every `--check-every` that must still be answered
correctly. It reports every status seen, each 5xx with what caused it, and the memory after against the baseline
(the goal: 0 answers of 500, memory back within 50 MiB). Loopback only; the cluster is stopped at the end.

    python bench/serve_fuzz.py [--requests 10000] [--clients 4]   # -> bench/results/serving/fuzz.json, fuzz.png
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() not in (REPO, REPO / "bench")]

MIB = 1 << 20
#: how far the service's memory may stay above its baseline after the run
GOAL_MIB = 50.0


def rss_mib(pids: dict[str, int]) -> float:
    import psutil

    return sum(psutil.Process(pid).memory_info().rss for pid in pids.values()) / MIB


def settled_rss(pids: dict[str, int], seconds: float = 3.0) -> float:
    """The service's memory once a moment has passed without requests (median of a few samples)."""
    samples = []
    for _ in range(5):
        time.sleep(seconds / 5)
        samples.append(rss_mib(pids))
    return float(np.median(samples))


class Fuzzer:
    """Sends malformed requests from several threads, tallying statuses and keeping every 5xx's cause."""

    def __init__(self, url: str, seed: int):
        self.url, self.seed = url, seed
        self.statuses: collections.Counter = collections.Counter()
        self.server_errors: list[dict] = []
        self.failed_checks: list[str] = []
        self._lock = threading.Lock()

    def send(self, count: int, clients: int, progress) -> None:
        threads = [threading.Thread(target=self._client, args=(c, count // clients + (c < count % clients), progress))
                   for c in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _client(self, number: int, count: int, progress) -> None:
        import requests

        from serving.fuzzing import malformed_body

        rng, session = np.random.default_rng([self.seed, number]), requests.Session()
        for _ in range(count):
            body, headers = malformed_body(rng)
            try:
                answer = session.post(self.url, data=body, headers=headers, timeout=60)
                status, text = answer.status_code, answer.text[:300]
            except requests.RequestException as exc:  # the connection itself failed: counted apart
                status, text = "connection error", str(exc)[:300]
            with self._lock:
                self.statuses[status] += 1
                if status == "connection error" or status >= 500:
                    self.server_errors.append({"status": status, "answer": text, "body": body[:300].decode(
                        "utf-8", "replace"), "headers": headers})
            progress.update(1)

    def check(self, expected_labels: np.ndarray) -> None:
        """A good request, answered correctly."""
        from serving.client import OipClient

        frames = np.zeros((1, *expected_labels.shape[1:], 3), np.uint8)
        try:
            labels = OipClient(self.url.rsplit("/v2/", 1)[0]).infer("fuzz", {"frames": frames}, {"labels": True})
            if not np.array_equal(labels["labels"], expected_labels):
                self.failed_checks.append("a good request got different labels")
        except Exception as exc:  # recorded, reported: the run goes on
            self.failed_checks.append(f"{type(exc).__name__}: {exc}")


def run(args) -> dict:
    from bench.serve_load import make_engine_file

    from export import OnnxRuntimeEngine
    from serving.cluster import free_port, service_process_ids, start_local
    from serving.config import ServeConfig

    side = 32
    engine_file = make_engine_file("unet", (side, side), Path(args.out) / "engines-32")
    expected = OnnxRuntimeEngine(str(engine_file), threads=1).segment(np.zeros((1, side, side, 3), np.uint8))
    config = ServeConfig(models=[{"name": "fuzz", "path": str(engine_file), "threads": 1}], port=free_port())
    service = start_local(config, metrics_port=free_port())
    try:
        fuzzer = Fuzzer(f"{service.url}/v2/models/fuzz/infer", args.seed)
        for _ in tqdm(range(args.warmup), desc="warm-up (good requests)"):
            fuzzer.check(expected)
        pids = service_process_ids()
        baseline = settled_rss(pids)
        trace = [(0, rss_mib(pids))]
        with tqdm(total=args.requests, desc="malformed requests") as progress:
            for sent in range(0, args.requests, args.check_every):
                fuzzer.send(min(args.check_every, args.requests - sent), args.clients, progress)
                fuzzer.check(expected)
                trace.append((sent + min(args.check_every, args.requests - sent), rss_mib(pids)))
        after = settled_rss(pids)
        alive = {name: pid for name, pid in pids.items() if _alive(pid)}
        return {"requests": args.requests, "clients": args.clients, "statuses": {str(k): v for k, v in
                sorted(fuzzer.statuses.items(), key=lambda kv: str(kv[0]))}, "server_errors": fuzzer.server_errors,
                "failed_checks": fuzzer.failed_checks, "baseline_mib": baseline, "after_mib": after,
                "growth_mib": after - baseline, "goal_mib": GOAL_MIB, "trace": trace, "processes": list(pids),
                "processes_replaced": sorted(set(pids) - set(alive))}
    finally:
        service.stop()


def _alive(pid: int) -> bool:
    import psutil

    return psutil.pid_exists(pid)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sent, rss = zip(*result["trace"])
    figure, axis = plt.subplots(figsize=(7, 3.5))
    axis.plot(sent, rss, marker=".", label="service RSS (proxy + ingress + replica)")
    axis.axhline(result["baseline_mib"], color="grey", linestyle="--", label="baseline after warm-up")
    axis.axhline(result["baseline_mib"] + GOAL_MIB, color="red", linestyle=":", label=f"baseline + {GOAL_MIB:.0f} MiB")
    axis.set_xlabel("malformed requests sent")
    axis.set_ylabel("MiB")
    fives = sum(v for k, v in result["statuses"].items() if k.startswith("5") or k == "connection error")
    axis.set_title(f"{result['requests']} malformed requests: {fives} answered 5xx; memory "
                   f"{result['growth_mib']:+.1f} MiB after")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=300, help="good requests before the baseline")
    parser.add_argument("--check-every", type=int, default=500, help="malformed requests between good ones")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/serving")
    args = parser.parse_args()
    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fuzz.json").write_text(json.dumps(result, indent=1, default=str))
    plot(result, out / "fuzz.png")
    fives = {k: v for k, v in result["statuses"].items() if k.startswith("5") or k == "connection error"}
    print(f"{result['requests']} malformed requests from {result['clients']} clients: statuses {result['statuses']}")
    print(f"5xx or failed connections: {sum(fives.values())} (goal 0); good requests answered wrongly or not: "
          f"{len(result['failed_checks'])}")
    print(f"service memory: {result['baseline_mib']:.0f} MiB after warm-up, {result['after_mib']:.0f} MiB after the "
          f"run: {result['growth_mib']:+.1f} MiB (goal within {GOAL_MIB:.0f})")
    print(f"wrote {out / 'fuzz.json'} and {out / 'fuzz.png'}")


if __name__ == "__main__":
    main()
