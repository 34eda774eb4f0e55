"""Fuzz the served Open Inference Protocol over REST, gRPC and system shared memory, and watch the service's
memory (issue 17).

A real local Ray cluster and Ray Serve on 127.0.0.1 serve a small U-Net (random weights: what is measured is the
front door, not the model), over HTTP and gRPC. After `--warmup` good requests on each path the service's resident
memory (HTTP proxy, ingress and model replicas, summed) is the baseline; then, path by path (`--paths`),
`--requests` malformed requests go in from `--clients` threads, with a good request every `--check-every` that must
still be answered correctly:
  rest  `serving.fuzzing.malformed_body`: mutated JSON fields, cut-off or lying binary parts, compressed garbage,
        wrong content types;
  grpc  `serving.fuzzing.malformed_grpc_requests`: distinct ModelInferRequests (bytes) with shapes that overflow,
        unknown datatypes, raw contents of the wrong size or count, typed contents gone wrong, bad names, models,
        outputs and parameters, bytes that are no message;
  shm   `serving.fuzzing.malformed_shm_requests`: distinct registrations (missing, unknown or bad keys, offsets and
        sizes wrong) and inferences naming regions wrongly (unregistered, too small, sizes and offsets wrong).
It reports every status seen per path, each server failure with what caused it (HTTP 5xx or a failed connection;
gRPC INTERNAL or UNKNOWN, the 500 of gRPC, or UNAVAILABLE), the gRPC and shared-memory answers that did not name
their case's problem, and the memory after each path against the baseline (the goal: 0 server failures, memory
back within 50 MiB). Loopback only; the cluster is stopped at the end.

    python bench/serve_fuzz.py [--requests 10000] [--clients 4] [--paths rest,grpc,shm]
    # -> bench/results/serving/fuzz.json, fuzz.png
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
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


#: the paths a run can fuzz
PATHS = ("rest", "grpc", "shm")
#: gRPC statuses that are the server's failure, not the request's: INTERNAL and UNKNOWN (gRPC's 500), UNAVAILABLE
#: (no answer: the connection or the server went)
GRPC_FAILURES = ("INTERNAL", "UNKNOWN", "UNAVAILABLE")
#: how long a request may take before it counts as failed
TIMEOUT_S = 60
#: what the labels region holds before a good shared-memory request writes it (no class has this label)
NO_CLASS = 255


class PathFuzzer:
    """One path's fuzz: malformed requests sent from several threads in batches, statuses tallied, every server
    failure kept with its request, and the answers that do not name their case's problem counted."""

    path = ""

    def __init__(self, service, expected: np.ndarray, seed: int):
        self.service, self.expected, self.seed = service, expected, seed
        self.statuses: collections.Counter = collections.Counter()
        self.server_errors: list[dict] = []
        self.failed_checks: list[str] = []
        self.unexplained: list[str] = []
        self.sent = 0
        self._lock = threading.Lock()
        self._cases = None

    # to be given by each path
    def cases(self, count: int):
        """An iterator of `count` malformed requests."""
        raise NotImplementedError

    def send_one(self, case, local: threading.local) -> tuple[object, str]:
        """(status, message) of one case's answer."""
        raise NotImplementedError

    def is_failure(self, status) -> bool:
        return status == "connection error" or status >= 500

    def good(self) -> np.ndarray:
        """The labels a good request on this path gets."""
        raise NotImplementedError

    # common
    def start(self, count: int) -> None:
        self._cases = iter(self.cases(count))

    def send(self, count: int, clients: int, progress) -> None:
        """The next `count` cases, from `clients` threads."""
        remaining = [count]
        threads = [threading.Thread(target=self._client, args=(remaining, progress)) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _client(self, remaining: list[int], progress) -> None:
        local = threading.local()
        while True:
            with self._lock:
                if remaining[0] <= 0:
                    return
                remaining[0] -= 1
                case = next(self._cases)
            status, message = self.send_one(case, local)
            self._record(case, status, message)
            progress.update(1)

    def _record(self, case, status, message: str) -> None:
        with self._lock:
            self.sent += 1
            self.statuses[status] += 1
            if self.is_failure(status):
                self.server_errors.append({"status": status, "answer": message[:300], "case": self.describe(case)})
            elif hasattr(case, "says") and (status not in case.statuses or not re.search(case.says, message)):
                self.unexplained.append(f"{case.name}: {status} {message[:200]!r}")

    def describe(self, case) -> str:
        return case.name

    def check(self) -> None:
        """A good request, answered correctly."""
        try:
            if not np.array_equal(self.good(), self.expected):
                self.failed_checks.append(f"after {self.sent} malformed: a good request got different labels")
        except Exception as exc:  # recorded, reported: the run goes on
            self.failed_checks.append(f"after {self.sent} malformed: {type(exc).__name__}: {exc}")

    def summary(self) -> dict:
        failures = sum(n for status, n in self.statuses.items() if self.is_failure(status))
        return {"requests": self.sent, "statuses": {str(k): v for k, v in sorted(self.statuses.items(),
                key=lambda kv: str(kv[0]))}, "server_failures": failures, "server_errors": self.server_errors,
                "not_naming_the_problem": len(self.unexplained), "unexplained": self.unexplained[:50],
                "failed_checks": self.failed_checks}


class RestFuzzer(PathFuzzer):
    """POST /v2/models/fuzz/infer with `serving.fuzzing.malformed_body` (drawn, so not all distinct)."""

    path = "rest"

    def cases(self, count: int):
        from serving.fuzzing import malformed_body

        rng = np.random.default_rng([self.seed, PATHS.index(self.path)])
        return (malformed_body(rng) for _ in range(count))

    def send_one(self, case, local):
        import requests

        body, headers = case
        session = local.__dict__.setdefault("session", requests.Session())
        try:
            answer = session.post(f"{self.service.url}/v2/models/fuzz/infer", data=body, headers=headers,
                                  timeout=TIMEOUT_S)
            return answer.status_code, answer.text[:300]
        except requests.RequestException as exc:  # the connection itself failed: counted apart
            return "connection error", str(exc)[:300]

    def describe(self, case) -> str:
        body, headers = case
        return json.dumps({"body": body[:300].decode("utf-8", "replace"), "headers": headers})

    def good(self) -> np.ndarray:
        from serving.client import OipClient

        frames = np.zeros((1, *self.expected.shape[1:], 3), np.uint8)
        return OipClient(self.service.url).infer("fuzz", {"frames": frames}, {"labels": True})["labels"]


class GrpcFuzzer(PathFuzzer):
    """ModelInfer with `serving.fuzzing.malformed_grpc_requests` (distinct), as bytes on one channel."""

    path = "grpc"

    def __init__(self, service, expected, seed):
        import grpc

        from serving.fuzzing import MODEL_INFER

        super().__init__(service, expected, seed)
        self.channel = grpc.insecure_channel(service.grpc_address)
        self.call = self.channel.unary_unary(MODEL_INFER)  # bytes in, bytes out

    def cases(self, count: int):
        from serving.fuzzing import malformed_grpc_requests

        return malformed_grpc_requests("fuzz", count, seed=self.seed)

    def send_one(self, case, local):
        import grpc

        try:
            self.call(case.request, timeout=TIMEOUT_S)
            return "OK", ""
        except grpc.RpcError as error:
            return error.code().name, error.details() or ""

    def is_failure(self, status) -> bool:
        return status in GRPC_FAILURES

    def good(self) -> np.ndarray:
        from tritonclient.grpc import service_pb2 as pb

        from serving.fuzzing import good_grpc_request

        answer = pb.ModelInferResponse.FromString(self.call(good_grpc_request("fuzz").SerializeToString(),
                                                            timeout=TIMEOUT_S))
        return np.frombuffer(answer.raw_output_contents[0], np.uint8).reshape(list(answer.outputs[0].shape))


class ShmFuzzer(PathFuzzer):
    """System shared memory over REST with `serving.fuzzing.malformed_shm_requests` (distinct), against two regions
    registered first: one black frame, and its labels."""

    path = "shm"

    def __init__(self, service, expected, seed):
        from tritonclient.utils import shared_memory as shm

        from serving.fuzzing import FRAME_BYTES, ShmSetup

        super().__init__(service, expected, seed)
        prefix = f"/patchwatch-fuzz-{os.getpid()}"
        self.frames = shm.create_shared_memory_region("fuzz-frames", f"{prefix}-frames", FRAME_BYTES)
        self.labels = shm.create_shared_memory_region("fuzz-labels", f"{prefix}-labels", expected.nbytes)
        shm.set_shared_memory_region(self.frames, [np.zeros(FRAME_BYTES, np.uint8)])
        self.setup = ShmSetup("fuzz", f"{prefix}-frames", f"{prefix}-labels", label_bytes=expected.nbytes)

    def register(self) -> None:
        import requests

        for region, key, size in self.setup.registrations():
            requests.post(f"{self.service.url}/v2/systemsharedmemory/region/{region}/register",
                          json={"key": key, "byte_size": size}, timeout=TIMEOUT_S).raise_for_status()

    def close(self) -> None:
        import requests
        from tritonclient.utils import shared_memory as shm

        for region, _, _ in self.setup.registrations():
            requests.post(f"{self.service.url}/v2/systemsharedmemory/region/{region}/unregister", timeout=TIMEOUT_S)
        for segment in (self.frames, self.labels):
            shm.destroy_shared_memory_region(segment)

    def cases(self, count: int):
        from serving.fuzzing import malformed_shm_requests

        return malformed_shm_requests(self.setup, count, seed=self.seed)

    def send_one(self, case, local):
        import requests

        session = local.__dict__.setdefault("session", requests.Session())
        request = case.request
        try:
            answer = session.request(request.method, self.service.url + request.path, data=request.body,
                                     headers=dict(request.headers), timeout=TIMEOUT_S)
        except requests.RequestException as exc:
            return "connection error", str(exc)[:300]
        return answer.status_code, _error(answer)

    def good(self) -> np.ndarray:
        import requests
        from tritonclient.utils import shared_memory as shm

        from serving.fuzzing import good_shm_infer, infer_http

        shm.set_shared_memory_region(self.labels, [np.full(self.expected.shape, NO_CLASS, np.uint8)])
        good = infer_http("fuzz", good_shm_infer(self.setup))
        requests.post(self.service.url + good.path, data=good.body, timeout=TIMEOUT_S).raise_for_status()
        return shm.get_contents_as_numpy(self.labels, np.uint8, self.expected.shape).copy()


FUZZERS = {"rest": RestFuzzer, "grpc": GrpcFuzzer, "shm": ShmFuzzer}


def _error(answer) -> str:
    """An HTTP answer's error message: the `error` of its JSON body, or its text when it has none."""
    if answer.status_code == 200:
        return ""
    try:
        return str(answer.json().get("error", ""))
    except ValueError:
        return answer.text[:300]


def run(args) -> dict:
    from bench.serve_load import make_engine_file

    from export import OnnxRuntimeEngine
    from serving.cluster import free_port, service_process_ids, start_local
    from serving.config import ServeConfig
    from serving.fuzzing import SIDE

    engine_file = make_engine_file("unet", (SIDE, SIDE), Path(args.out) / "engines-32")
    expected = OnnxRuntimeEngine(str(engine_file), threads=1).segment(np.zeros((1, SIDE, SIDE, 3), np.uint8))
    config = ServeConfig(models=[{"name": "fuzz", "path": str(engine_file), "threads": 1}], port=free_port(),
                         grpc_port=free_port())
    service = start_local(config, metrics_port=free_port())
    fuzzers: list[PathFuzzer] = []
    try:
        for path in args.paths:
            fuzzers.append(FUZZERS[path](service, expected, args.seed))
            if isinstance(fuzzers[-1], ShmFuzzer):
                fuzzers[-1].register()
            for _ in tqdm(range(args.warmup), desc=f"warm-up ({path}, good requests)"):
                fuzzers[-1].check()
        pids = service_process_ids()
        baseline = settled_rss(pids)
        trace, memory = [("start", 0, rss_mib(pids))], {}
        for fuzzer in fuzzers:
            trace += fuzz_path(fuzzer, args, pids, trace[-1][1])
            memory[fuzzer.path] = settled_rss(pids)
        after = memory[fuzzers[-1].path]
        alive = {name: pid for name, pid in pids.items() if _alive(pid)}
        return {"requests_per_path": args.requests, "clients": args.clients, "check_every": args.check_every,
                "paths": {f.path: f.summary() | {"after_mib": memory[f.path]} for f in fuzzers},
                "baseline_mib": baseline, "after_mib": after, "growth_mib": after - baseline, "goal_mib": GOAL_MIB,
                "trace": trace, "processes": list(pids), "processes_replaced": sorted(set(pids) - set(alive))}
    finally:
        for fuzzer in fuzzers:
            if isinstance(fuzzer, ShmFuzzer):
                fuzzer.close()
        service.stop()


def fuzz_path(fuzzer: PathFuzzer, args, pids: dict[str, int], before: int) -> list[tuple[str, int, float]]:
    """`args.requests` malformed requests on one path, a good one every `args.check_every`; the memory trace
    ((path, malformed requests sent in the run, `before` this path's included), service MiB)."""
    fuzzer.start(args.requests)
    trace = []
    with tqdm(total=args.requests, desc=f"malformed requests ({fuzzer.path})") as progress:
        for sent in range(0, args.requests, args.check_every):
            batch = min(args.check_every, args.requests - sent)
            fuzzer.send(batch, args.clients, progress)
            fuzzer.check()
            trace.append((fuzzer.path, before + sent + batch, rss_mib(pids)))
    return trace


def _alive(pid: int) -> bool:
    import psutil

    return psutil.pid_exists(pid)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.5))
    trace = result["trace"]  # (path, malformed requests sent so far, MiB), from a "start" point
    for name in result["paths"]:
        indices = [i for i, point in enumerate(trace) if point[0] == name]
        segment = trace[indices[0] - 1:indices[-1] + 1]  # from the point before the path began
        axis.plot([p[1] for p in segment], [p[2] for p in segment], marker=".", label=f"service RSS during {name}")
    axis.axhline(result["baseline_mib"], color="grey", linestyle="--", label="baseline after warm-up")
    axis.axhline(result["baseline_mib"] + GOAL_MIB, color="red", linestyle=":", label=f"baseline + {GOAL_MIB:.0f} MiB")
    axis.set_xlabel("malformed requests sent (paths in turn)")
    axis.set_ylabel("MiB")
    failures = sum(p["server_failures"] for p in result["paths"].values())
    axis.set_title(f"{result['requests_per_path']} malformed requests a path ({', '.join(result['paths'])}): "
                   f"{failures} server failures; memory {result['growth_mib']:+.1f} MiB after", fontsize=9)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def paths(text: str) -> list[str]:
    chosen = [p.strip() for p in text.split(",") if p.strip()]
    unknown = sorted(set(chosen) - set(PATHS))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"paths are a comma-separated choice of {', '.join(PATHS)}")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000, help="malformed requests on each path")
    parser.add_argument("--paths", type=paths, default=list(PATHS), help="comma-separated: rest,grpc,shm")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=300, help="good requests on each path before the baseline")
    parser.add_argument("--check-every", type=int, default=500, help="malformed requests between good ones")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/serving")
    args = parser.parse_args()
    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fuzz.json").write_text(json.dumps(result, indent=1, default=str))
    plot(result, out / "fuzz.png")
    report(result)
    print(f"wrote {out / 'fuzz.json'} and {out / 'fuzz.png'}")


def report(result: dict) -> None:
    for name, summary in result["paths"].items():
        print(f"{name}: {summary['requests']} malformed requests from {result['clients']} clients: statuses "
              f"{summary['statuses']}")
        print(f"  server failures (5xx, INTERNAL/UNKNOWN/UNAVAILABLE, failed connections): "
              f"{summary['server_failures']} (goal 0); answers not naming their case's problem: "
              f"{summary['not_naming_the_problem']}; good requests answered wrongly or not: "
              f"{len(summary['failed_checks'])}; service memory after: {summary['after_mib']:.0f} MiB")
    print(f"service memory: {result['baseline_mib']:.0f} MiB after warm-up, {result['after_mib']:.0f} MiB after the "
          f"run: {result['growth_mib']:+.1f} MiB (goal within {GOAL_MIB:.0f})")


if __name__ == "__main__":
    main()
