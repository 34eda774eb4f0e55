"""What the cluster does when a node goes, and how Serve scales with load (issue 17, item 6). Three parts, all on
this machine, every process started here stopped by its own handle (never `ray stop`):

- campaign: a Ray head and a second node (1 CPU each); a campaign submitted as a Ray job; the second node's raylet
  killed while it runs a trial. Reports trials expected / stored / duplicated / failed and which node ran each.
- serve: a head (2 CPUs) and a second node (1 CPU), each offering one `model_slot`, `patchwatch serve --address` with
  a replica on each node, steady load (`serving.probe.LoadProbe`); the second node's raylet killed. Reports the
  failed requests, the error window, latency before / around / after the loss (ratio to before), and how long the
  head took to declare the node dead.
- autoscale: a local service whose model autoscales 1..2 replicas at `target_ongoing_requests` 1; 6 clients until
  the second replica runs (and `HOLD_S` more), then idle until one is left. Reports the replicas over time.

    python bench/cluster_faults.py [--parts campaign,serve,autoscale] [--load-s 300]
    # -> bench/results/cluster/faults.json, faults.png
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() not in (REPO, REPO / "bench")]

from serving.cluster import free_port, start_head, start_node, wait_ready  # noqa: E402
from serving.probe import LoadProbe  # noqa: E402

BIN = Path(sys.executable).parent
OUT = REPO / "bench" / "results" / "cluster"
#: the model's deployment: its name and version
DEPLOYMENT = "shapes_v1"
#: the custom resource each node offers once and each model replica needs: one replica per node
SLOT = "model_slot"
#: requests in a row that must succeed before the loss (steady state) and after it (recovered)
STREAK = 20
#: the frame every request carries
FRAME_SIZE = (64, 64)


def random_twin(folder: Path) -> Path:
    """A shapes U-Net with random weights: the machinery is measured, not the attack."""
    import torch

    from segmenters.data import dataset_classes
    from segmenters.models import build_model
    from segmenters.spec import ModelSpec
    from segmenters.twin import save_twin

    torch.manual_seed(0)
    spec = ModelSpec(arch="unet", classes=dataset_classes("shapes"), input_size=(128, 128), dataset="shapes")
    path = folder / "shapes_unet.pt"
    save_twin(path, build_model("unet", spec.num_classes), spec)
    return path


def stored_nodes(run: Path) -> list[tuple[str, str]]:
    if not (run / "trials.sqlite").exists():
        return []
    with sqlite3.connect(run / "trials.sqlite") as db:
        try:
            return list(db.execute("SELECT id, node FROM trials"))
        except sqlite3.OperationalError:
            return []


def campaign_part(folder: Path) -> dict:
    from audit.campaign import expand, load_campaign

    config = folder / "campaign.yaml"
    config.write_text(yaml.safe_dump({
        "name": "node-loss", "models": [str(random_twin(folder))], "images": {"dataset": "shapes", "split": "val",
                                                                             "count": 4},
        "targets": [{"kind": "switch"}], "patch_sizes": [4, 8], "seeds": [0], "attack": {"steps": 40, "eot_samples": 1},
        "eot_eval_draws": 2}))
    expected = {t.id for t in expand(load_campaign(config))}
    run = folder / "run"
    head = start_head(num_cpus=1, joinable=True)
    try:
        node = start_node(head, num_cpus=1)
        job: dict = {}
        started = time.monotonic()
        submit = threading.Thread(target=lambda: job.update(done=head.submit(
            ["audit", "campaign", "campaign.yaml", "--out", str(run), "--quiet"], working_dir=folder)))
        submit.start()
        while submit.is_alive() and not (any(node.node_id[:8] in (n or "") for _, n in stored_nodes(run))
                                         and node.runs("_run_trial")):
            time.sleep(0.2)
        killed_after = time.monotonic() - started
        node.kill_raylet()
        submit.join()
        node.stop()
    finally:
        head.stop()
    rows = stored_nodes(run)
    ids = [trial for trial, _ in rows]
    by_node: dict[str, int] = {}
    for _, name in rows:
        by_node[name] = by_node.get(name, 0) + 1
    return {"expected": len(expected), "stored": len(set(ids) & expected), "duplicated": len(ids) - len(set(ids)),
            "lost": len(expected - set(ids)), "job_succeeded": "succeeded" in job["done"].stdout + job["done"].stderr,
            "killed_after_s": killed_after, "seconds": time.monotonic() - started, "by_node": by_node}


def serve_config(folder: Path, engine: Path, port: int) -> Path:
    path = folder / "serve.yaml"
    path.write_text(yaml.safe_dump({
        "port": port, "proxy_location": "HeadOnly",
        "models": [{"name": "shapes", "path": str(engine), "num_replicas": 2, "resources": {SLOT: 1}, "threads": 1,
                    "num_cpus": 1, "health_check_period_s": 2, "max_batch_size": 4, "batch_wait_ms": 1}]}))
    return path


def onnx_engine(folder: Path) -> Path:
    from export import export_onnx
    from segmenters.twin import load_twin

    path = folder / "shapes.onnx"
    export_onnx(load_twin(random_twin(folder)), path)
    return path


def node_dead(head, node_id: str) -> bool:
    return any(n["node_id"] == node_id and n["state"] == "DEAD" for n in head.nodes())


def serve_part(folder: Path) -> tuple[dict, list]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    head = start_head(num_cpus=2, resources={SLOT: 1}, joinable=True)
    try:
        node = start_node(head, num_cpus=1, resources={SLOT: 1})
        service = subprocess.Popen([str(BIN / "patchwatch"), "serve", "--config", str(serve_config(
            folder, onnx_engine(folder), port)), "--address", head.gcs_address], env=head.env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_ready(url, timeout_s=600, running=lambda: service.poll() is None)
            head.wait_replica_on_each_node(DEPLOYMENT, timeout_s=600)  # the lost node must have held one
            frames = np.random.default_rng(0).integers(0, 256, (1, *FRAME_SIZE, 3), dtype=np.uint8)
            with LoadProbe(url, "shapes", frames) as probe:
                probe.wait_for(STREAK)
                before_at = probe.snapshot()[0].started
                killed_at = time.monotonic()
                node.kill_raylet()
                while not node_dead(head, node.node_id):
                    time.sleep(0.2)
                dead_at = time.monotonic()
                recovered = probe.wait_for(STREAK, after=dead_at)
                time.sleep(5)  # a few seconds of service after the loss, for the "after" latency
            result = figures(probe, before_at, killed_at, dead_at, recovered)
            return result, [(o.started - killed_at, o.seconds, o.status) for o in probe.snapshot()]
        finally:
            service.terminate()
            service.wait(timeout=120)
            node.stop()
    finally:
        head.stop()


def figures(probe: LoadProbe, before_at: float, killed_at: float, dead_at: float, recovered: bool) -> dict:
    outcomes = probe.snapshot()
    before = [o.seconds for o in outcomes if before_at <= o.started < killed_at]
    around = [o.seconds for o in outcomes if killed_at <= o.started < dead_at]
    after = [o.seconds for o in outcomes if o.started >= dead_at]
    p50 = {name: float(np.median(part)) * 1000 if part else float("nan")
           for name, part in (("before", before), ("until_dead", around), ("after", after))}
    return {"after_kill": probe.summary(killed_at), "recovered": recovered, "declared_dead_after_s": dead_at - killed_at,
            "p50_ms": p50, "p50_ratio_until_dead_vs_before": p50["until_dead"] / p50["before"],
            "p50_ratio_after_vs_before": p50["after"] / p50["before"]}


def autoscale_part(folder: Path, load_s: float) -> tuple[dict, list]:
    from serving.cluster import start_local
    from serving.config import ServeConfig

    config = ServeConfig(models=[{"name": "shapes", "path": str(onnx_engine(folder)), "threads": 1, "num_cpus": 0.5,
                                  "max_batch_size": 1, "batch_wait_ms": 0, "autoscaling": AUTOSCALING}],
                         port=free_port())
    service = start_local(config, metrics_port=free_port())
    timeline: list = []
    try:
        frames = np.random.default_rng(0).integers(0, 256, (1, *FRAME_SIZE, 3), dtype=np.uint8)
        with LoadProbe(service.url, "shapes", frames, clients=LOAD_CLIENTS) as probe:
            started = time.monotonic()
            record_replicas(timeline, started, LOAD_CLIENTS, until=lambda: timeline and timeline[-1][1] == 2,
                            limit_s=load_s)
            record_replicas(timeline, started, LOAD_CLIENTS, until=lambda: False, limit_s=HOLD_S)
            unloaded = time.monotonic() - started
        record_replicas(timeline, started, 0, until=lambda: timeline[-1][1] == 1 and timeline[-1][2] == 0,
                        limit_s=load_s)
    finally:
        service.stop()
    return {**AUTOSCALING, "clients": LOAD_CLIENTS, "max_running": max(row[1] for row in timeline),
            "second_replica_starting_after_s": next((t for t, r, s, _ in timeline if r + s >= 2), None),
            "second_replica_running_after_s": next((t for t, r, _, _ in timeline if r >= 2), None),
            "back_to_one_after_unload_s": next((t - unloaded for t, r, _, c in timeline if c == 0 and r == 1), None),
            "failed": probe.summary(0)["failed"]}, timeline


#: the autoscaling the bench drives: one replica at rest, two under `LOAD_CLIENTS` clients
AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 0,
               "downscale_delay_s": 2}
LOAD_CLIENTS = 6
#: how long the load stays on once the second replica runs (both serving)
HOLD_S = 10.0


def record_replicas(timeline: list, started: float, clients: int, until, limit_s: float) -> None:
    """Appends (s since `started`, running, starting, clients) about once a second until `until()` or `limit_s`."""
    from ray import serve

    from serving.cluster import APP_NAME

    phase_end = time.monotonic() + limit_s
    while time.monotonic() < phase_end:
        states = serve.status().applications[APP_NAME].deployments[DEPLOYMENT].replica_states
        timeline.append((time.monotonic() - started, states.get("RUNNING", 0), states.get("STARTING", 0), clients))
        if until():
            return
        time.sleep(1)


def plot(serve_timeline: list, autoscale_timeline: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    if serve_timeline:
        t, seconds, status = (np.array(v) for v in zip(*serve_timeline))
        axes[0].scatter(t[status == 200], seconds[status == 200] * 1000, s=3, label="answered")
        axes[0].scatter(t[status != 200], seconds[status != 200] * 1000, s=12, c="red", label="failed")
        axes[0].axvline(0, color="k", ls="--", label="second node's raylet killed")
        axes[0].set(xlabel="s from the kill", ylabel="request latency (ms)", yscale="log", title="Serve: node loss")
        axes[0].legend()
    if autoscale_timeline:
        t, running, starting, clients = zip(*autoscale_timeline)
        axes[1].step(t, running, where="post", label="running replicas")
        axes[1].step(t, np.add(running, starting), where="post", ls="--", label="running + starting")
        axes[1].step(t, np.array(clients) / LOAD_CLIENTS, where="post", ls=":", label=f"load on ({LOAD_CLIENTS} clients)")
        axes[1].set(xlabel="s", ylabel="replicas", title="Serve: autoscaling (target 1 ongoing request)")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="campaign,serve,autoscale")
    parser.add_argument("--load-s", type=float, default=300.0,
                        help="the longest the autoscaling load waits for a second replica, and the idle wait for one")
    args = parser.parse_args()
    parts = args.parts.split(",")
    OUT.mkdir(parents=True, exist_ok=True)
    result, serve_timeline, autoscale_timeline = {}, [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if "autoscale" in parts:  # first: its local node is on loopback only while this process imports ray first
            (folder / "autoscale").mkdir()
            result["autoscale"], autoscale_timeline = autoscale_part(folder / "autoscale", args.load_s)
        if "campaign" in parts:
            (folder / "campaign").mkdir()
            result["campaign"] = campaign_part(folder / "campaign")
        if "serve" in parts:
            (folder / "serve").mkdir()
            result["serve"], serve_timeline = serve_part(folder / "serve")
    result["autoscale_timeline"] = autoscale_timeline
    (OUT / "faults.json").write_text(json.dumps(result, indent=2))
    plot(serve_timeline, autoscale_timeline, OUT / "faults.png")
    print(json.dumps({k: v for k, v in result.items() if k != "autoscale_timeline"}, indent=2))


if __name__ == "__main__":
    main()
