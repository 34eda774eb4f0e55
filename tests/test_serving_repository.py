"""The model repository extension (index, load, unload) of the served application over real HTTP: a real local
Ray cluster and Ray Serve on 127.0.0.1 with an API key, driven through the stock `tritonclient.http` client.
The engine is an untrained shapes U-Net exported to ONNX here (no data needed)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

pytestmark = pytest.mark.slow

tritonhttp = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

API_KEY_ENV = "PATCHWATCH_TEST_REPOSITORY_KEY"
API_KEY = "repository-test-key"


def auth() -> dict[str, str]:
    """The API key header, a fresh dict per call: tritonclient adds its own headers to the dict it is given."""
    return {"Authorization": f"Bearer {API_KEY}"}

FRAME_SIDE = 64


@pytest.fixture(scope="module")
def engine_path(shapes_twin, tmp_path_factory):
    from export import export_onnx
    from segmenters.twin import load_twin

    path = tmp_path_factory.mktemp("repository") / "shapes.onnx"
    export_onnx(load_twin(shapes_twin), path)
    return path


@pytest.fixture(scope="module")
def service(engine_path):
    import os

    from serving.cluster import free_port, start_local
    from serving.config import ServeConfig

    os.environ[API_KEY_ENV] = API_KEY
    config = ServeConfig(
        models=[{"name": "shapes", "version": "1", "path": str(engine_path), "threads": 1, "num_cpus": 0.5},
                {"name": "shapes", "version": "2", "path": str(engine_path), "threads": 1, "num_cpus": 0.5},
                {"name": "other", "version": "1", "path": str(engine_path), "threads": 1, "num_cpus": 0.5}],
        port=free_port(), api_key_env=API_KEY_ENV)
    service = start_local(config, metrics_port=free_port())
    yield service
    service.stop()
    os.environ.pop(API_KEY_ENV, None)


@pytest.fixture(scope="module")
def client(service):
    return tritonhttp.InferenceServerClient(service.url.removeprefix("http://"), network_timeout=300.0)


def frames() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (1, FRAME_SIDE, FRAME_SIDE, 3), dtype=np.uint8)


def infer(client, name: str, version: str = "") -> np.ndarray:
    batch = frames()
    tensor = tritonhttp.InferInput("frames", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch, binary_data=True)
    result = client.infer(name, [tensor], model_version=version, headers=auth(),
                          outputs=[tritonhttp.InferRequestedOutput("logits", binary_data=True)])
    return result.as_numpy("logits")


def index(client) -> dict[tuple[str, str], dict]:
    return {(entry["name"], entry["version"]): entry for entry in client.get_model_repository_index(headers=auth())}


def replicas(deployment: str) -> int:
    from ray import serve

    return sum(serve.status().applications["patchwatch"].deployments[deployment].replica_states.values())


def wait_until(condition, what: str, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s:.0f} s"
        time.sleep(1)


def test_index_lists_every_version_ready(client):
    assert index(client) == {
        ("other", "1"): {"name": "other", "version": "1", "state": "READY", "reason": ""},
        ("shapes", "1"): {"name": "shapes", "version": "1", "state": "READY", "reason": ""},
        ("shapes", "2"): {"name": "shapes", "version": "2", "state": "READY", "reason": ""},
    }


def test_repository_calls_need_the_api_key(service, client):
    for call in (client.get_model_repository_index, lambda: client.load_model("shapes"),
                 lambda: client.unload_model("shapes")):
        with pytest.raises(InferenceServerException) as caught:
            call()
        assert caught.value.status() == "401" and "API key" in caught.value.message()
    wrong = requests.post(f"{service.url}/v2/repository/models/shapes/unload", timeout=60,
                          headers={"Authorization": "Bearer not-the-key"})
    assert wrong.status_code == 401 and wrong.json() == {"error": "the API key is not valid"}
    assert client.is_model_ready("shapes", headers=auth())  # nothing was unloaded


def test_unknown_model_and_unsupported_load_parameters_are_refused(service, client):
    for call in (client.load_model, client.unload_model):
        with pytest.raises(InferenceServerException) as caught:
            call("kitti", headers=auth())
        assert caught.value.status() == "404" and "unknown model 'kitti'" in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        client.load_model("shapes", headers=auth(), config='{"max_batch_size": 4}')
    assert caught.value.status() == "400" and "'config'" in caught.value.message()
    bad = requests.post(f"{service.url}/v2/repository/index", data=b"[1, 2", timeout=60, headers=auth())
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]


def test_unload_then_load_round_trip(service, client):
    before = infer(client, "shapes")
    other_before = infer(client, "other")

    client.unload_model("shapes", headers=auth())
    assert not client.is_model_ready("shapes", headers=auth())
    assert not client.is_model_ready("shapes", "1", headers=auth())
    with pytest.raises(InferenceServerException) as caught:
        infer(client, "shapes", "1")
    assert caught.value.status() == "503", caught.value
    assert "model 'shapes' version '1' is unloaded" in caught.value.message()
    refused = requests.get(f"{service.url}/v2/models/shapes", headers=auth(), timeout=60)
    assert refused.status_code == 503 and "unloaded" in refused.json()["error"]
    states = index(client)
    assert states[("shapes", "1")] == {"name": "shapes", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}
    assert states[("shapes", "2")]["state"] == "UNAVAILABLE" and states[("other", "1")]["state"] == "READY"
    ready_only = requests.post(f"{service.url}/v2/repository/index", json={"ready": True}, headers=auth(), timeout=60)
    assert [(e["name"], e["state"]) for e in ready_only.json()] == [("other", "READY")]
    # the rest of the server serves on, and counts as ready without the unloaded model
    assert client.is_server_ready() and client.is_model_ready("other", headers=auth())
    np.testing.assert_array_equal(infer(client, "other"), other_before)
    wait_until(lambda: replicas("shapes_v1") == 0 and replicas("shapes_v2") == 0, "the shapes replicas stopping")

    client.load_model("shapes", headers=auth())
    assert client.is_model_ready("shapes", headers=auth()) and client.is_model_ready("shapes", "1", headers=auth())
    np.testing.assert_array_equal(infer(client, "shapes"), before)
    assert {entry["state"] for entry in index(client).values()} == {"READY"}
    assert replicas("shapes_v1") == 1 and replicas("shapes_v2") == 1


def test_concurrent_loads_and_unloads_end_whole(service, client):
    """Loads and unloads of one model racing each other: each answers, and after a final load the model has one
    deployment per version with its configured replicas, and answers."""
    from ray import serve

    def call(unload: bool) -> None:  # a client per thread: tritonclient's are not thread-safe
        own = tritonhttp.InferenceServerClient(service.url.removeprefix("http://"), network_timeout=300.0)
        (own.unload_model if unload else own.load_model)("shapes", headers=auth())

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(call, [True, False, True, False]))
    client.load_model("shapes", headers=auth())
    assert client.is_model_ready("shapes", headers=auth())
    deployments = serve.status().applications["patchwatch"].deployments
    assert sorted(deployments) == ["InferenceServer", "other_v1", "shapes_v1", "shapes_v2"]
    wait_until(lambda: replicas("shapes_v1") == 1 and replicas("shapes_v2") == 1, "one replica per version")
    assert infer(client, "shapes").shape[0] == 1
    assert index(client)[("shapes", "1")]["state"] == "READY"
