"""The service on a cluster of two Ray nodes on this machine (a head and a joined node, both started by the test
and stopped by their own handles): a replica on each node, the second node lost under load, the service answering
on; and autoscaling driven by load, up and back down. Figures (error window, failed requests, replica counts over
time) are measured by bench/cluster_faults.py; these tests assert what the service promises."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from serving.cluster import free_port, start_head, start_node, wait_ready
from serving.probe import LoadProbe

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
#: the custom resource each node offers once and each model replica needs: one replica per node
SLOT = "model_slot"
#: requests in a row that must succeed, before the loss and after it
STREAK = 20
#: the model's deployment: its name and version
DEPLOYMENT = "shapes_v1"


@pytest.fixture(scope="module")
def shapes_engine(shapes_twin, tmp_path_factory):
    from export import export_onnx
    from segmenters.twin import load_twin

    path = tmp_path_factory.mktemp("engine") / "shapes.onnx"
    export_onnx(load_twin(shapes_twin), path)
    return path


def frames_for(size=(64, 64)) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (1, *size, 3), dtype=np.uint8)


def serve_config(folder: Path, engine: Path, port: int) -> Path:
    path = folder / "serve.yaml"
    path.write_text(yaml.safe_dump({
        "port": port, "proxy_location": "HeadOnly",  # two nodes of one machine cannot both bind the port
        "models": [{"name": "shapes", "path": str(engine), "num_replicas": 2, "resources": {SLOT: 1}, "threads": 1,
                    "num_cpus": 1, "health_check_period_s": 2, "max_batch_size": 4, "batch_wait_ms": 1}]}))
    return path


def node_state(head, node_id: str) -> str:
    return next((n["state"] for n in head.nodes() if n["node_id"] == node_id), "UNKNOWN")


#: shared-memory requests sent while a replica runs on each node (each replica gets some: the router spreads them)
SHARED_MEMORY_REQUESTS = 16


def check_shared_memory_on_both_nodes(url: str, engine_path: Path) -> None:
    """Stock tritonclient.http with the frame and labels in shared memory of the head: the head's replica reads and
    writes the segments itself; the other node's replica answers `SegmentElsewhere` and the ingress sends it the
    data instead. Every answer is the engine's, in the client's region."""
    import tritonclient.http as tritonhttp
    from tritonclient.utils import shared_memory as shm

    from export import OnnxRuntimeEngine

    frames = frames_for()
    expected = OnnxRuntimeEngine(str(engine_path), threads=1).segment(frames)
    client = tritonhttp.InferenceServerClient(url.split("://", 1)[1])
    sizes = {"frames": frames.nbytes, "labels": expected.nbytes}
    regions = {kind: shm.create_shared_memory_region(kind, f"/patchwatch-cluster-test-{kind}", size)
               for kind, size in sizes.items()}
    try:
        shm.set_shared_memory_region(regions["frames"], [frames])
        for kind, size in sizes.items():
            client.register_system_shared_memory(kind, f"/patchwatch-cluster-test-{kind}", size)
        frames_input = tritonhttp.InferInput("frames", list(frames.shape), "UINT8")
        frames_input.set_shared_memory("frames", frames.nbytes)
        labels_output = tritonhttp.InferRequestedOutput("labels")
        labels_output.set_shared_memory("labels", expected.nbytes)
        for _ in range(SHARED_MEMORY_REQUESTS):
            shm.set_shared_memory_region(regions["labels"], [np.zeros_like(expected)])
            client.infer("shapes", [frames_input], outputs=[labels_output])
            np.testing.assert_array_equal(shm.get_contents_as_numpy(regions["labels"], np.uint8,
                                                                    list(expected.shape)), expected)
    finally:
        client.unregister_system_shared_memory()
        for region in regions.values():
            shm.destroy_shared_memory_region(region)


def test_a_lost_node_keeps_the_service_answering(shapes_engine, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    head = start_head(num_cpus=2, resources={SLOT: 1}, joinable=True)
    log = tmp_path / "serve.log"
    try:
        node = start_node(head, num_cpus=1, resources={SLOT: 1})
        with open(log, "w") as out:
            service = subprocess.Popen([str(BIN / "patchwatch"), "serve", "--config",
                                        str(serve_config(tmp_path, shapes_engine, port)), "--address",
                                        head.gcs_address], env=head.env, stdout=out, stderr=subprocess.STDOUT)
        try:
            try:
                wait_ready(url, timeout_s=600, running=lambda: service.poll() is None)
            except (RuntimeError, TimeoutError) as exc:
                raise AssertionError(f"{exc}: {log.read_text()[-3000:]}") from exc
            placed = head.wait_replica_on_each_node(DEPLOYMENT, timeout_s=600)
            assert len(placed) == 2 and node.node_id in placed, placed  # a replica on each node, and no more
            check_shared_memory_on_both_nodes(url, shapes_engine)
            with LoadProbe(url, "shapes", frames_for()) as probe:
                assert probe.wait_for(STREAK), f"no steady answers before the loss: {probe.summary(0)}"
                killed_at = time.monotonic()
                node.kill_raylet()
                while node_state(head, node.node_id) != "DEAD":
                    time.sleep(0.5)
                dead_at = time.monotonic()
                assert probe.wait_for(STREAK, after=dead_at), f"the service did not answer on: {probe.summary(0)}"
            print(json.dumps({"after_kill": probe.summary(killed_at)}))
            placed = head.replica_nodes(DEPLOYMENT)
            assert placed and node.node_id not in placed, placed
        finally:
            service.terminate()
            service.wait(timeout=120)
            node.stop()
    finally:
        head.stop()


def running_replicas(deployment: str) -> int:
    from ray import serve

    from serving.cluster import APP_NAME

    status = serve.status().applications[APP_NAME].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def wait_replicas(deployment: str, count: int, timeout_s: float = 600) -> list[int]:
    """Polls the running replica count until it is `count`; returns the counts seen (fails after `timeout_s`)."""
    seen, deadline = [], time.monotonic() + timeout_s
    while not seen or seen[-1] != count:
        assert time.monotonic() < deadline, f"{deployment}: never {count} replicas running, saw {seen}"
        seen.append(running_replicas(deployment))
        time.sleep(0.5)
    return seen


def test_load_scales_a_deployment_up_and_back_down(shapes_engine):
    from serving.cluster import start_local
    from serving.config import ServeConfig

    autoscaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 0,
                   "downscale_delay_s": 2}
    config = ServeConfig(models=[{"name": "shapes", "path": str(shapes_engine), "threads": 1, "num_cpus": 0.5,
                                  "max_batch_size": 1, "batch_wait_ms": 0, "autoscaling": autoscaling}],
                         port=free_port())
    service = start_local(config, metrics_port=free_port())
    try:
        assert wait_replicas(DEPLOYMENT, 1) == [1]
        with LoadProbe(service.url, "shapes", frames_for(), clients=6) as probe:
            wait_replicas(DEPLOYMENT, 2)  # 6 requests in flight against a target of 1 a replica
        assert probe.summary(0)["failed"] == 0
        wait_replicas(DEPLOYMENT, 1)  # idle again: back to min_replicas
    finally:
        service.stop()
