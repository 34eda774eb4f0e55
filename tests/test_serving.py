"""The served application over real HTTP: a real local Ray cluster and Ray Serve on 127.0.0.1, started once
for this module and stopped at its end. Every endpoint, JSON and binary, every bad input, batching seen in the
metrics, and a replica killed under load."""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import socket
import sys
import threading
import zlib
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from export import OnnxRuntimeEngine
from segmenters.data.frames import decode_image
from serving.client import OipClient, OipError, RemoteEngine
from serving.cluster import free_port
from serving.config import ServeConfig
from serving.protocol import HEADER_LENGTH, encode_infer_request

pytestmark = [pytest.mark.slow, pytest.mark.data]

MAX_BODY_MB = 4
#: takes the 360x480 CamVid upload, refuses a 700x700 frame (the default engine bytes a pixel)
REQUEST_BUDGET_MB = 128
BODY_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def engines(camvid_unet_engines):
    return camvid_unet_engines


@pytest.fixture(scope="module")
def service(engines):
    from serving.cluster import start_local

    config = ServeConfig(
        models=[
            # two replicas of version 1, so one can be killed while the other answers; a long batch wait so
            # concurrent requests visibly share engine runs
            {"name": "camvid", "version": "1", "path": str(engines["1"]), "num_replicas": 2, "batch_wait_ms": 50,
             "max_batch_size": 8, "threads": 1, "health_check_period_s": 2},
            {"name": "camvid", "version": "2", "path": str(engines["2"]), "threads": 1},
        ],
        port=free_port(), max_body_mb=MAX_BODY_MB, request_budget_mb=REQUEST_BUDGET_MB, body_timeout_s=BODY_TIMEOUT_S,
    )
    service = start_local(config, metrics_port=free_port())
    yield service
    service.stop()


@pytest.fixture(scope="module")
def local(engines):
    return {version: OnnxRuntimeEngine(path, threads=1) for version, path in engines.items()}


@pytest.fixture(scope="module")
def val_frames(data_root):
    files = sorted((data_root / "camvid" / "val").glob("*.png"))[:3]
    return [decode_image(f.read_bytes()) for f in files], files


def small(frames, size=(96, 128)):
    return np.stack([np.asarray(Image.fromarray(f).resize(size[::-1], Image.BILINEAR)) for f in frames])


def test_server_health_and_metadata(service, camvid_unet):
    _, twin = camvid_unet
    client = OipClient(service.url)
    meta = client.server_metadata()
    assert meta["name"] == "patchwatch" and "binary_tensor_data" in meta["extensions"]
    assert client.live() and client.ready()
    assert client.model_ready("camvid") and client.model_ready("camvid", "1") and client.model_ready("camvid", "2")
    assert requests.get(f"{service.url}/v2/models/camvid/versions/7/ready").status_code == 404

    latest = client.model_metadata("camvid")
    assert latest["versions"] == ["1", "2"] and latest["parameters"]["version"] == "2"  # highest by default
    assert latest["parameters"]["precision"] == "fp16"
    first = client.model_metadata("camvid", "1")
    assert first["parameters"]["precision"] == "fp32" and first["platform"] == "onnxruntime_onnx"
    assert {t["name"]: t["datatype"] for t in first["inputs"]} == {"images": "FP32", "frames": "UINT8"}
    assert first["outputs"][0] == {"name": "logits", "datatype": "FP32", "shape": [-1, twin.spec.num_classes, -1, -1]}
    assert first["model_spec"] == twin.spec.model_dump(mode="json")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_served_logits_equal_the_engine_in_process(service, local, val_frames, binary):
    frames, _ = val_frames
    engine = local["1"]
    images = engine.prepare(small(frames[:2]))
    client = OipClient(service.url)
    out = client.infer("camvid", {"images": images}, version="1", binary=binary)
    expected = engine.infer(images)
    assert out["logits"].shape == expected.shape and out["logits"].dtype == np.float32
    np.testing.assert_allclose(out["logits"], expected, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(out["labels"], expected.argmax(1))


def test_uint8_frames_are_normalised_on_the_server(service, local, val_frames):
    frames, _ = val_frames
    batch = small(frames)
    client = OipClient(service.url)
    labels = client.infer("camvid", {"frames": batch}, {"labels": True}, version="1")
    assert list(labels) == ["labels"] and labels["labels"].dtype == np.uint8
    np.testing.assert_array_equal(labels["labels"], local["1"].labels(local["1"].prepare(batch)))
    # the FP16 version answers too, within FP16's parity tolerance of FP32
    half = client.infer("camvid", {"frames": batch}, {"labels": False}, version="2")["labels"]
    assert (half == labels["labels"]).mean() > 0.99


def test_binary_wire_format_over_raw_http(service, local, val_frames):
    frames, _ = val_frames
    batch = small(frames[:1])
    body, headers = encode_infer_request({"frames": batch}, {"labels": True, "logits": False}, request_id="abc")
    answer = requests.post(f"{service.url}/v2/models/camvid/versions/1/infer", data=body, headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/octet-stream"
    length = int(answer.headers[HEADER_LENGTH])
    header = json.loads(answer.content[:length])
    assert header["id"] == "abc" and header["model_name"] == "camvid" and header["model_version"] == "1"
    labels_out, logits_out = header["outputs"]
    assert labels_out["parameters"]["binary_data_size"] == 96 * 128 and "data" not in labels_out
    assert "data" in logits_out and "parameters" not in logits_out
    labels = np.frombuffer(answer.content[length:], np.uint8).reshape(labels_out["shape"])
    np.testing.assert_array_equal(labels, local["1"].labels(local["1"].prepare(batch)))
    # no outputs named: every output, as JSON
    plain = requests.post(f"{service.url}/v2/models/camvid/infer",
                          json={"inputs": [{"name": "frames", "datatype": "UINT8", "shape": list(batch.shape),
                                            "data": batch.reshape(-1).tolist()}]})
    assert plain.headers["content-type"] == "application/json"
    assert [o["name"] for o in plain.json()["outputs"]] == ["logits", "labels"]


def test_remote_engine_is_an_engine(service, local, val_frames):
    frames, _ = val_frames
    remote = RemoteEngine(service.url, "camvid", version="1")
    assert remote.spec == local["1"].spec and remote.precision == "fp32"
    images = remote.prepare(small(frames[:2]))
    np.testing.assert_allclose(remote.infer(images), local["1"].infer(images), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(remote.labels(images), local["1"].labels(images))
    np.testing.assert_array_equal(remote.segment(small(frames[:2])), local["1"].labels(images))


def monitor_inside_the_cluster(clip: np.ndarray) -> dict:
    """A Ray task's body: what a monitor running inside the cluster does with its engine (the deployment handle,
    no HTTP). It runs in a worker of the service's cluster, as `patchwatch monitor` does in a Ray job, because a
    deployment handle leaves Serve's router thread in its process for good: in this test process it would outlive
    the cluster and poll dead actors through every later test's Ray session."""
    from monitor.pipeline import Monitor
    from monitor.streams import ReplaySource, Stream
    from serving.model import ServeHandleEngine

    handle = ServeHandleEngine("camvid", "1")
    images = handle.prepare(clip)
    seen = []
    monitor = Monitor(handle, on_frame=lambda frame, labels, alarms: seen.append((frame.index, labels)))
    monitor.add(Stream(ReplaySource(list(clip), name="cam"), policy="drop_oldest", capacity=8))
    summary = monitor.run(duration=60)
    try:
        ServeHandleEngine("camvid", "9")
        unknown_version_error = None
    except Exception as exc:  # noqa: BLE001 - the message is what is checked
        unknown_version_error = str(exc)
    return {"spec": handle.spec, "precision": handle.precision, "backend": handle.backend, "images": images,
            "logits": handle.infer(images), "segment": handle.segment(clip), "summary": summary, "seen": seen,
            "unknown_version_error": unknown_version_error}


def test_monitor_inside_the_cluster_holds_a_serve_handle_engine(service, local, val_frames):
    """The monitor's engine inside the cluster: the deployment handle, no HTTP; same labels as in process."""
    import ray
    from ray import cloudpickle  # the pickler Ray sends tasks with

    frames, _ = val_frames
    clip = small(frames)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # this test module is not importable by workers
    try:
        task = ray.remote(monitor_inside_the_cluster).options(num_cpus=0, max_retries=0)
        found = ray.get(task.remote(clip), timeout=300)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert found["spec"] == local["1"].spec and found["precision"] == "fp32" and "camvid_v1" in found["backend"]
    images = found["images"]
    np.testing.assert_array_equal(images, local["1"].prepare(clip))
    np.testing.assert_allclose(found["logits"], local["1"].infer(images), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(found["segment"], local["1"].labels(images))
    summary = found["summary"]
    assert summary["streams"]["cam"]["processed"] == len(clip) and summary["engine_errors"] == 0
    for index, labels in found["seen"]:
        np.testing.assert_array_equal(labels, local["1"].labels(images[index:index + 1])[0])
    assert "no served model 'camvid' version '9'" in found["unknown_version_error"]


def test_segment_endpoint_answers_in_three_forms(service, local, val_frames):
    frames, files = val_frames
    png = files[0].read_bytes()
    engine = local["1"]
    expected = engine.labels(engine.prepare(frames[0]))[0]
    client = OipClient(service.url)

    labels = client.segment("camvid", png, "labels", version="1")
    assert labels.headers["content-type"] == "image/png" and labels.headers["x-model-version"] == "1"
    image = Image.open(io.BytesIO(labels.content))
    assert image.mode == "P" and image.size == (480, 360)
    np.testing.assert_array_equal(np.asarray(image), expected)

    overlay = client.segment("camvid", png, "overlay", version="1")
    assert overlay.headers["content-type"] == "image/png"
    assert np.asarray(Image.open(io.BytesIO(overlay.content))).shape == (360, 480, 3)
    jpeg = requests.post(f"{service.url}/v2/models/camvid/versions/1/segment", data=png,
                         headers={"Content-Type": "image/png", "Accept": "image/jpeg"})
    assert jpeg.headers["content-type"] == "image/jpeg" and jpeg.content[:2] == b"\xff\xd8"

    buffer = io.BytesIO()
    Image.fromarray(frames[0]).save(buffer, format="JPEG", quality=95)
    areas = requests.post(f"{service.url}/v2/models/camvid/versions/1/segment", data=buffer.getvalue(),
                          headers={"Content-Type": "image/jpeg", "Accept": "application/json"}).json()
    assert (areas["height"], areas["width"]) == (360, 480)
    assert [c["name"] for c in areas["classes"]] == engine.spec.class_names
    assert abs(sum(c["fraction"] for c in areas["classes"]) - 1.0) < 1e-6
    from_png = client.segment("camvid", png, "areas", version="1").json()
    assert [c["pixels"] for c in from_png["classes"]] == np.bincount(expected.reshape(-1),
                                                                     minlength=engine.spec.num_classes).tolist()


def _tensor(name, datatype, array):
    return {"name": name, "datatype": datatype, "shape": list(array.shape), "data": array.reshape(-1).tolist()}


BAD_REQUESTS = {
    # name: (method, path, kwargs, status, words in the error)
    "corrupt image": ("post", "/v2/models/camvid/segment",
                      {"data": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "headers": {"Content-Type": "image/png"}},
                      400, "cannot decode image"),
    "truncated image": ("post", "/v2/models/camvid/segment", {"truncate": True, "headers": {"Content-Type": "image/png"}},
                        400, "truncated"),
    "upload as JSON": ("post", "/v2/models/camvid/segment", {"json": {"image": "x"}}, 415, "not an image upload"),
    "image to infer": ("post", "/v2/models/camvid/infer", {"data": b"\x89PNG", "headers": {"Content-Type": "image/png"}},
                       415, "application/json"),
    "bad JSON": ("post", "/v2/models/camvid/infer", {"data": b'{"inputs": [', "headers": {"Content-Type": "application/json"}},
                 400, "not valid JSON"),
    "four channels": ("post", "/v2/models/camvid/infer",
                      {"json": {"inputs": [_tensor("images", "FP32", np.zeros((1, 4, 32, 32), np.float32))]}},
                      400, "3 channels"),
    "uint8 images": ("post", "/v2/models/camvid/infer",
                     {"json": {"inputs": [_tensor("images", "UINT8", np.zeros((1, 3, 32, 32), np.uint8))]}},
                     400, "must be FP32"),
    "unknown datatype": ("post", "/v2/models/camvid/infer",
                         {"json": {"inputs": [{**_tensor("images", "FP32", np.zeros((1, 3, 32, 32))), "datatype": "F32"}]}},
                         400, "unknown datatype"),
    "data count": ("post", "/v2/models/camvid/infer",
                   {"json": {"inputs": [{**_tensor("images", "FP32", np.zeros((1, 3, 32, 32))), "shape": [1, 3, 32, 33]}]}},
                   400, "needs 3168"),
    "binary size mismatch": ("post", "/v2/models/camvid/infer", {"binary_mismatch": True}, 400, "binary_data_size"),
    "too many images": ("post", "/v2/models/camvid/infer",
                        {"json": {"inputs": [_tensor("frames", "UINT8", np.zeros((9, 32, 32, 3), np.uint8))]}},
                        400, "at most 8"),
    "too many pixels": ("post", "/v2/models/camvid/infer",
                        {"json": {"inputs": [_tensor("frames", "UINT8", np.zeros((1, 700, 700, 3), np.uint8))]}},
                        413, "over the limit"),
    "oversized body": ("post", "/v2/models/camvid/infer",
                       {"data": b"0" * (MAX_BODY_MB * 1024 * 1024 + 1), "headers": {"Content-Type": "application/json"}},
                       413, "over the limit"),
    "NaN": ("post", "/v2/models/camvid/infer",  # JSON has no NaN, but Python's json (and others) write one
            {"data": json.dumps({"inputs": [_tensor("images", "FP32", np.full((1, 3, 32, 32), np.nan))]}).encode(),
             "headers": {"Content-Type": "application/json"}}, 400, "NaN"),
    "unknown output": ("post", "/v2/models/camvid/infer",
                       {"json": {"inputs": [_tensor("frames", "UINT8", np.zeros((1, 32, 32, 3), np.uint8))],
                                 "outputs": [{"name": "softmax"}]}}, 400, "unknown output"),
    "unknown model": ("post", "/v2/models/kitti/infer", {"json": {}}, 404, "unknown model 'kitti'"),
    "unknown version": ("get", "/v2/models/camvid/versions/3", {}, 404, "no version '3'"),
    "wrong method": ("get", "/v2/models/camvid/infer", {}, 405, "not allowed"),
    "unknown route": ("get", "/v3/anything", {}, 404, "no route"),
    "empty body": ("post", "/v2/models/camvid/infer", {"data": b"", "headers": {"Content-Type": "application/json"}},
                   400, "empty"),
    # these four answered 500 once (issue 17's fuzz run)
    "element count overflows int64": ("post", "/v2/models/camvid/infer",
                                      {"json": {"inputs": [{"name": "frames", "datatype": "UINT8",
                                                            "shape": [2**32, 2**32], "data": []}]}}, 400, "over"),
    "datatype is a list": ("post", "/v2/models/camvid/infer",
                           {"json": {"inputs": [{**_tensor("frames", "UINT8", np.zeros((1, 32, 32, 3), np.uint8)),
                                                 "datatype": ["UINT8"]}]}}, 400, "unknown datatype"),
    "65 dimensions": ("post", "/v2/models/camvid/infer",
                      {"json": {"inputs": [{"name": "frames", "datatype": "UINT8", "shape": [1] * 65, "data": [0]}]}},
                      400, "65 dimensions"),
    "JSON nested 100000 deep": ("post", "/v2/models/camvid/infer",
                                {"data": b"[" * 100000 + b"]" * 100000, "headers": {"Content-Type": "application/json"}},
                                400, "nested too deeply"),
    "unknown content encoding": ("post", "/v2/models/camvid/infer",
                                 {"data": b"{}", "headers": {"Content-Type": "application/json",
                                                             "Content-Encoding": "br"}}, 415, "Content-Encoding"),
    "gzip bomb": ("post", "/v2/models/camvid/infer",
                  {"data": gzip.compress(b" " * (MAX_BODY_MB * 1024 * 1024 + 1)),
                   "headers": {"Content-Type": "application/json", "Content-Encoding": "gzip"}}, 413, "inflates past"),
    "cut-off gzip": ("post", "/v2/models/camvid/infer",
                     {"data": gzip.compress(b'{"inputs": []}')[:-6],
                      "headers": {"Content-Type": "application/json", "Content-Encoding": "gzip"}},
                     400, "not one whole gzip stream"),
    "broken gzip": ("post", "/v2/models/camvid/infer",
                    {"data": b"\x1f\x8b not gzip", "headers": {"Content-Type": "application/json",
                                                               "Content-Encoding": "gzip"}}, 400, "not valid gzip"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_a_4xx_and_the_service_answers_on(service, val_frames, case):
    method, path, kwargs, status, words = BAD_REQUESTS[case]
    kwargs = dict(kwargs)
    if kwargs.pop("truncate", False):
        png = val_frames[1][0].read_bytes()
        kwargs["data"] = png[: len(png) // 3]
    if kwargs.pop("binary_mismatch", False):
        frames = np.zeros((1, 32, 32, 3), np.uint8)
        body, headers = encode_infer_request({"frames": frames})
        kwargs.update(data=body[:-7], headers=headers)  # seven bytes short of what binary_data_size says
    answer = getattr(requests, method)(service.url + path, timeout=60, **kwargs)
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/json"
    assert words in answer.json()["error"], answer.json()
    # ... and the service is still up and right
    ok = OipClient(service.url).infer("camvid", {"frames": np.zeros((1, 32, 32, 3), np.uint8)}, {"labels": True})
    assert ok["labels"].shape == (1, 32, 32)


def test_head_allow_and_compressed_requests(service):
    """HEAD answers wherever GET does; a 405 says what is allowed; gzip and deflate bodies are decoded."""
    for path in ("/v2", "/v2/health/ready", "/v2/models/camvid", "/v2/models/camvid/versions/2/ready"):
        get, head = requests.get(service.url + path, timeout=60), requests.head(service.url + path, timeout=60)
        assert head.status_code == get.status_code == 200, (path, head.status_code)
        assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]
    wrong = requests.get(service.url + "/v2/models/camvid/infer", timeout=60)
    assert wrong.status_code == 405 and "POST" in wrong.headers["allow"], wrong.headers
    frames = np.random.default_rng(3).integers(0, 255, (1, 32, 32, 3), dtype=np.uint8)
    body, headers = encode_infer_request({"frames": frames}, outputs={"labels": True})
    plain = OipClient(service.url).infer("camvid", {"frames": frames}, {"labels": True})["labels"]
    for encoding, data in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
        answer = requests.post(f"{service.url}/v2/models/camvid/infer", data=data, timeout=60,
                               headers={**headers, "Content-Encoding": encoding})
        assert answer.status_code == 200, answer.text
        length = int(answer.headers[HEADER_LENGTH])
        np.testing.assert_array_equal(np.frombuffer(answer.content[length:], np.uint8).reshape(1, 32, 32), plain)


def test_a_stalled_upload_is_answered_408(service):
    """A client that declares 1000 bytes and sends 10 gets 408 once `body_timeout_s` has passed, and the
    service answers on."""
    host, port = service.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=BODY_TIMEOUT_S + 30) as connection:
        connection.sendall(b"POST /v2/models/camvid/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 1000\r\n\r\n{\"inputs\":")
        answer = b""
        while b"did not arrive" not in answer and (chunk := connection.recv(65536)):  # headers, then the body
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b"did not arrive within" in answer
    ok = OipClient(service.url).infer("camvid", {"frames": np.zeros((1, 32, 32, 3), np.uint8)}, {"labels": True})
    assert ok["labels"].shape == (1, 32, 32)


def _metric_samples(text: str, family: str) -> list[tuple[dict, float]]:
    samples = []
    for line in text.splitlines():
        if line.startswith(family + "{"):
            labels, value = line[len(family) + 1:].rsplit("} ", 1)
            tags = dict(part.split("=", 1) for part in labels.split('",') if "=" in part)
            samples.append(({k: v.strip('"') for k, v in tags.items()}, float(value)))
    return samples


def test_concurrent_requests_are_batched_and_counted(service, val_frames):
    frames = small(val_frames[0])
    client = OipClient(service.url)
    requests.post(f"{service.url}/v2/models/camvid/infer", data=b"{", headers={"Content-Type": "application/json"})

    def one(i):
        return client.infer("camvid", {"frames": frames[i % 3: i % 3 + 1]}, {"labels": True}, version="1")

    with ThreadPoolExecutor(16) as pool:
        assert all(out["labels"].shape == (1, 96, 128) for out in pool.map(one, range(48)))

    deadline = time.monotonic() + 60
    while True:  # Ray's metrics agent exports every few seconds
        text = requests.get(f"{service.url}/metrics", timeout=10).text
        batches = [(t, v) for t, v in _metric_samples(text, "ray_patchwatch_batch_size_count")
                   if t.get("model") == "camvid" and t.get("version") == "1"]
        images = [(t, v) for t, v in _metric_samples(text, "ray_patchwatch_images_total")
                  if t.get("model") == "camvid" and t.get("version") == "1"]
        errors = [v for t, v in _metric_samples(text, "ray_patchwatch_request_errors_total")
                  if t.get("reason") == "bad_request"]
        if batches and sum(v for _, v in images) >= 48 and errors:
            break
        assert time.monotonic() < deadline, "patchwatch metrics never appeared on /metrics"
        time.sleep(2)
    runs, served = sum(v for _, v in batches), sum(v for _, v in images)
    assert served / runs > 1.5, f"{served} images in {runs} engine runs: requests were not batched"
    latency = _metric_samples(text, "ray_patchwatch_request_latency_ms_count")
    assert any(t.get("endpoint") == "infer" and t.get("model") == "camvid" for t, _ in latency)
    codes = {t.get("code") for t, _ in _metric_samples(text, "ray_patchwatch_requests_total")}
    assert {"200", "400"} <= codes


def _replicas(deployment: str) -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if "SERVE_REPLICA" in a["name"] and f"#{deployment}#" in a["name"]]


def test_a_replica_killed_under_load_is_replaced_and_requests_succeed(service, val_frames):
    import ray
    from ray import serve

    frames = small(val_frames[0])
    client = OipClient(service.url)
    before = _replicas("camvid_v1")
    assert len(before) == 2, before
    statuses, stop = [], threading.Event()

    def load():
        while not stop.is_set():
            try:
                client.infer("camvid", {"frames": frames[:1]}, {"labels": True}, version="1")
                statuses.append(200)
            except OipError as exc:
                statuses.append(exc.status)

    workers = [threading.Thread(target=load) for _ in range(4)]
    for worker in workers:
        worker.start()
    time.sleep(2)
    done_before_kill = len(statuses)
    ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
    time.sleep(3)
    stop.set()
    for worker in workers:
        worker.join(timeout=60)
    assert done_before_kill > 0 and len(statuses) > done_before_kill
    assert statuses.count(200) == len(statuses), f"failed requests around the kill: {statuses}"

    deadline = time.monotonic() + 120
    while True:  # Serve notices the dead replica and starts a new one
        status = serve.status().applications["patchwatch"].deployments["camvid_v1"]
        current = _replicas("camvid_v1")
        if len(current) == 2 and before[0] not in current and status.status == "HEALTHY":
            break
        assert time.monotonic() < deadline, f"replica not replaced: {current}, {status}"
        time.sleep(1)
    after = [client.infer("camvid", {"frames": frames[:1]}, {"labels": True}, version="1") for _ in range(4)]
    assert all(out["labels"].shape == (1, 96, 128) for out in after)


@pytest.fixture()
def shm_regions():
    """POSIX shared-memory segments made by the stock tritonclient helper, destroyed after the test."""
    shm = pytest.importorskip("tritonclient.utils.shared_memory")
    made = []

    def make(name: str, size: int):
        made.append(shm.create_shared_memory_region(name, f"/patchwatch-test-{os.getpid()}-{name}", size))
        return made[-1], f"/patchwatch-test-{os.getpid()}-{name}"

    yield make
    for region in made:
        shm.destroy_shared_memory_region(region)


def _triton_http(service):
    tritonhttp = pytest.importorskip("tritonclient.http")
    return tritonhttp, tritonhttp.InferenceServerClient(service.url.split("://", 1)[1])


def test_frames_in_and_labels_out_through_system_shared_memory(service, local, val_frames, shm_regions):
    """Stock tritonclient.http and tritonclient.utils.shared_memory, unchanged: frames are read from a region that
    starts 64 bytes into its segment, labels written into another; the answer carries no tensor bytes."""
    from tritonclient.utils import shared_memory as shm

    tritonhttp, client = _triton_http(service)
    batch = np.ascontiguousarray(small(val_frames[0][:2]))
    expected = local["1"].labels(local["1"].prepare(batch))
    frames_segment, frames_key = shm_regions("frames", 64 + batch.nbytes)
    labels_segment, labels_key = shm_regions("labels", expected.nbytes + 100)
    shm.set_shared_memory_region(frames_segment, [batch], offset=64)
    client.register_system_shared_memory("frames", frames_key, batch.nbytes, offset=64)
    client.register_system_shared_memory("labels", labels_key, expected.nbytes + 100)
    try:
        assert {r["name"]: r["byte_size"] for r in client.get_system_shared_memory_status()} == {
            "frames": batch.nbytes, "labels": expected.nbytes + 100}
        frames_input = tritonhttp.InferInput("frames", list(batch.shape), "UINT8")
        frames_input.set_shared_memory("frames", batch.nbytes)
        labels_output = tritonhttp.InferRequestedOutput("labels")
        labels_output.set_shared_memory("labels", expected.nbytes + 100)
        result = client.infer("camvid", [frames_input], model_version="1", outputs=[labels_output])
        answer = result.get_output("labels")
        assert "data" not in answer and answer["parameters"] == {"shared_memory_region": "labels",
                                                                  "shared_memory_byte_size": expected.nbytes}
        labels = shm.get_contents_as_numpy(labels_segment, np.uint8, answer["shape"])
        np.testing.assert_array_equal(labels, expected)
    finally:
        client.unregister_system_shared_memory()
    assert client.get_system_shared_memory_status() == []


def _shm_refusal(client, call) -> str:
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as refused:
        call()
    assert refused.value.status() in ("400", "404"), refused.value
    return refused.value.message()


def test_shared_memory_regions_are_checked_and_never_read_past(service, local, val_frames, shm_regions):
    """Every misuse of a region is a 4xx naming the problem, and the service answers a good request after."""
    tritonhttp, client = _triton_http(service)
    batch = np.ascontiguousarray(small(val_frames[0][:1]))
    from tritonclient.utils import shared_memory as shm

    segment, key = shm_regions("bad", batch.nbytes)
    shm.set_shared_memory_region(segment, [batch])
    register = client.register_system_shared_memory
    assert "no shared-memory segment" in _shm_refusal(client, lambda: register("r", key + "-gone", 8))
    assert "runs past the end of segment" in _shm_refusal(client, lambda: register("r", key, batch.nbytes, 1))
    register("r", key, batch.nbytes)
    try:
        assert "already registered" in _shm_refusal(client, lambda: register("r", key, 8))

        def infer(region="r", size=batch.nbytes, offset=0, shape=batch.shape):
            frames_input = tritonhttp.InferInput("frames", list(shape), "UINT8")
            frames_input.set_shared_memory(region, size, offset=offset)
            return client.infer("camvid", [frames_input], model_version="1")

        assert "no shared-memory region 'elsewhere'" in _shm_refusal(client, lambda: infer(region="elsewhere"))
        assert "need" in _shm_refusal(client, lambda: infer(size=batch.nbytes - 1))
        assert "runs past the end of region" in _shm_refusal(client, lambda: infer(offset=1))
        labels_output = tritonhttp.InferRequestedOutput("labels")
        labels_output.set_shared_memory("r", 10)
        frames_input = tritonhttp.InferInput("frames", list(batch.shape), "UINT8")
        frames_input.set_data_from_numpy(batch)
        assert "more than its shared_memory_byte_size" in _shm_refusal(
            client, lambda: client.infer("camvid", [frames_input], model_version="1", outputs=[labels_output]))
        np.testing.assert_array_equal(infer().as_numpy("labels"), local["1"].labels(local["1"].prepare(batch)))
    finally:
        client.unregister_system_shared_memory("r")


#: distinct malformed shared-memory requests the fuzz test sends: registrations and inferences, each catalog form
#: once (fewer than the catalog holds: each kind in turn), then combinations
SHM_FUZZ_CASES = 150
#: a label no CamVid class has: what the labels region holds before each good request writes it
NO_CLASS = 255


def test_fuzzed_shared_memory_requests_get_a_4xx_naming_the_problem(service, local, shm_regions):
    """`serving.fuzzing`'s malformed shared-memory requests (registrations: missing, unknown or bad keys, offsets
    and sizes of the wrong type, negative, overflowing or past the segment; inferences: regions unregistered or
    too small, sizes that are not the tensor's, offsets past the region, parameters of the wrong type): each gets
    the 4xx and words its case names, none a 500; after each, a good request reads its frame from one region and
    writes the right labels into the other; the regions registered are the two the test made."""
    from tritonclient.utils import shared_memory as shm

    from serving.fuzzing import FRAME_BYTES, SIDE, ShmSetup, good_shm_infer, infer_http, malformed_shm_requests

    frames_segment, frames_key = shm_regions("fuzz-frames", FRAME_BYTES)
    labels_segment, labels_key = shm_regions("fuzz-labels", SIDE * SIDE)
    setup = ShmSetup("camvid", frames_key, labels_key)
    frame = np.zeros((1, SIDE, SIDE, 3), np.uint8)
    shm.set_shared_memory_region(frames_segment, [frame])
    expected = local["2"].labels(local["2"].prepare(frame))  # version 2: what a request naming none gets
    session = requests.Session()
    for region, key, size in setup.registrations():
        registered = session.post(f"{service.url}/v2/systemsharedmemory/region/{region}/register",
                                  json={"key": key, "byte_size": size}, timeout=60)
        assert registered.status_code == 200, registered.text
    try:
        failures = []
        for case in malformed_shm_requests(setup, SHM_FUZZ_CASES, seed=17):
            request = case.request
            answer = session.request(request.method, service.url + request.path, data=request.body,
                                     headers=dict(request.headers), timeout=60)
            error = answer.json().get("error", "") if answer.status_code != 200 else ""
            if answer.status_code not in case.statuses or not re.search(case.says, error):
                failures.append(f"{case.name}: {answer.status_code} {error[:200]!r}")
            shm.set_shared_memory_region(labels_segment, [np.full(expected.shape, NO_CLASS, np.uint8)])
            good = infer_http(setup.model, good_shm_infer(setup))
            answered = session.post(service.url + good.path, data=good.body, timeout=60)
            labels = shm.get_contents_as_numpy(labels_segment, np.uint8, expected.shape)
            if answered.status_code != 200 or not np.array_equal(labels, expected):
                failures.append(f"after {case.name}: a good request got {answered.status_code} or other labels")
        names = sorted(r["name"] for r in session.get(f"{service.url}/v2/systemsharedmemory/status").json())
        assert names == sorted(region for region, _, _ in setup.registrations())
        assert not failures, f"{len(failures)} of {SHM_FUZZ_CASES}:\n" + "\n".join(failures[:20])
    finally:
        for region, _, _ in setup.registrations():
            session.post(f"{service.url}/v2/systemsharedmemory/region/{region}/unregister", timeout=60)
