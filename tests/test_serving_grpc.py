"""The Open Inference Protocol over gRPC against `patchwatch serve`'s application: a real local Ray cluster and Ray
Serve on 127.0.0.1 with an API key, started once for this module. The stock `tritonclient.grpc` client runs
health, metadata and inference unchanged (raw tensors), with the answers of the REST route and of the engine in
process; malformed requests, sent with the protocol's own stub, get the status that names what was wrong, and the
service answers a good request after each."""

from __future__ import annotations

import re

import grpc
import numpy as np
import pytest
import requests
from PIL import Image

from export import OnnxRuntimeEngine
from segmenters.data.frames import decode_image
from serving.client import OipClient
from serving.cluster import free_port
from serving.config import ServeConfig
from serving.fuzzing import MODEL_INFER, SIDE, good_grpc_request, malformed_grpc_requests

tritongrpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2 as pb, service_pb2_grpc as pb_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.data]

KEY_VARIABLE = "PATCHWATCH_GRPC_TEST_KEY"
API_KEY = "grpc-test-key-0123456789"
AUTH = {"authorization": f"Bearer {API_KEY}"}
MAX_BODY_MB = 4
SIZE = (96, 128)


@pytest.fixture(scope="module")
def service(camvid_unet_engines):
    from serving.cluster import start_local

    config = ServeConfig(
        models=[{"name": "camvid", "version": "1", "path": str(camvid_unet_engines["1"]), "threads": 1,
                 "max_batch_size": 4}],
        port=free_port(), grpc_port=free_port(), direct_port=free_port(), api_key_env=KEY_VARIABLE,
        max_body_mb=MAX_BODY_MB)
    # the replicas read the key from the environment the local cluster is started with
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(KEY_VARIABLE, API_KEY)
        service = start_local(config, metrics_port=free_port())
        yield service
        service.stop()


@pytest.fixture(scope="module")
def engine(camvid_unet_engines):
    return OnnxRuntimeEngine(camvid_unet_engines["1"], threads=1)


@pytest.fixture(scope="module")
def frames(data_root):
    files = sorted((data_root / "camvid" / "val").glob("*.png"))[:2]
    return np.stack([np.asarray(Image.fromarray(decode_image(f.read_bytes())).resize(SIZE[::-1], Image.BILINEAR))
                     for f in files])


@pytest.fixture(scope="module")
def client(service):
    with tritongrpc.InferenceServerClient(service.grpc_address) as client:
        yield client


@pytest.fixture(scope="module")
def stub(service):
    with grpc.insecure_channel(service.grpc_address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def triton_infer(client, inputs: dict[str, np.ndarray], outputs=("logits", "labels"), headers=AUTH):
    tensors = []
    for name, array in inputs.items():
        tensor = tritongrpc.InferInput(name, list(array.shape), "FP32" if array.dtype == np.float32 else "UINT8")
        tensor.set_data_from_numpy(array)  # raw_input_contents, as the client sends by default
        tensors.append(tensor)
    result = client.infer("camvid", tensors, outputs=[tritongrpc.InferRequestedOutput(o) for o in outputs],
                          headers=headers)
    return {name: result.as_numpy(name) for name in outputs}, result


def test_grpc_port_is_on_the_service_host_only(service):
    assert service.urls()["grpc"] == f"127.0.0.1:{service.config.grpc_port}"
    models = service.config.model_dump()["models"]
    for ports in ({"port": 9000, "grpc_port": 9000}, {"port": 9000, "grpc_port": 9001, "direct_port": 9001}):
        with pytest.raises(ValueError, match="needs a port of its own"):
            ServeConfig(models=models, **ports)


def test_stock_client_health_and_metadata(client, service, engine):
    # health answers without the key, as the REST health routes do
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("camvid", headers=AUTH) and client.is_model_ready("camvid", "1", headers=AUTH)
    server = client.get_server_metadata(headers=AUTH, as_json=True)
    assert server["name"] == "patchwatch" and "binary_tensor_data" in server["extensions"]

    meta = client.get_model_metadata("camvid", headers=AUTH, as_json=True)
    rest = OipClient(service.url, api_key=API_KEY).model_metadata("camvid")
    assert meta["name"] == "camvid" and meta["versions"] == ["1"] and meta["platform"] == rest["platform"]
    for kind in ("inputs", "outputs"):
        assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta[kind]] == \
               [(t["name"], t["datatype"], t["shape"]) for t in rest[kind]]
    assert [int(d) for d in meta["outputs"][0]["shape"]] == [-1, engine.spec.num_classes, -1, -1]


def test_stock_client_infers_raw_tensors_as_rest_and_the_engine(client, service, engine, frames):
    images = engine.prepare(frames)
    out, result = triton_infer(client, {"images": images})
    expected = engine.infer(images)
    assert out["logits"].dtype == np.float32 and out["logits"].shape == expected.shape
    np.testing.assert_allclose(out["logits"], expected, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(out["labels"], expected.argmax(1))
    answer = result.get_response(as_json=True)
    assert answer["model_name"] == "camvid" and answer["model_version"] == "1"

    rest = OipClient(service.url, api_key=API_KEY).infer("camvid", {"frames": frames}, {"labels": True})
    by_grpc, _ = triton_infer(client, {"frames": frames}, outputs=("labels",))
    assert list(by_grpc) == ["labels"] and by_grpc["labels"].dtype == np.uint8
    np.testing.assert_array_equal(by_grpc["labels"], rest["labels"])
    np.testing.assert_array_equal(by_grpc["labels"], engine.labels(images))


def test_typed_contents_are_read_too(stub, engine, frames):
    """A request with `contents.uint_contents` instead of raw bytes (what other OIP clients send)."""
    batch = frames[:1]
    request = pb.ModelInferRequest(model_name="camvid", id="typed")
    request.inputs.add(name="frames", datatype="UINT8", shape=list(batch.shape)).contents.uint_contents.extend(
        batch.reshape(-1).tolist())
    request.outputs.add(name="labels")
    answer = stub.ModelInfer(request, metadata=tuple(AUTH.items()))
    assert answer.id == "typed" and [o.name for o in answer.outputs] == ["labels"]
    labels = np.frombuffer(answer.raw_output_contents[0], np.uint8).reshape(list(answer.outputs[0].shape))
    np.testing.assert_array_equal(labels, engine.labels(engine.prepare(batch)))


@pytest.fixture()
def segments():
    """POSIX shared-memory segments made by the stock tritonclient helper, destroyed after the test."""
    from tritonclient.utils import shared_memory as shm

    made = []

    def make(name: str, size: int):
        key = f"/patchwatch-grpc-test-{name}"
        made.append(shm.create_shared_memory_region(name, key, size))
        return made[-1], key

    yield make
    for segment in made:
        shm.destroy_shared_memory_region(segment)


def test_stock_client_passes_frames_and_labels_through_shared_memory(client, service, engine, frames, segments):
    """tritonclient.grpc and tritonclient.utils.shared_memory, unchanged: frames read from a region 32 bytes into
    its segment, labels written into another; the answer carries no tensor bytes. A region registered over REST
    serves gRPC too (one registry per ingress replica), and unregistering over gRPC empties it."""
    from tritonclient.utils import shared_memory as shm

    expected = engine.labels(engine.prepare(frames))
    frames_segment, frames_key = segments("frames", 32 + frames.nbytes)
    labels_segment, labels_key = segments("labels", expected.nbytes)
    shm.set_shared_memory_region(frames_segment, [np.ascontiguousarray(frames)], offset=32)
    client.register_system_shared_memory("frames", frames_key, frames.nbytes, offset=32, headers=AUTH)
    rest = requests.post(f"{service.url}/v2/systemsharedmemory/region/labels/register", timeout=30, headers=AUTH,
                         json={"key": labels_key, "offset": 0, "byte_size": expected.nbytes})
    assert rest.status_code == 200, rest.text
    try:
        status = client.get_system_shared_memory_status(headers=AUTH, as_json=True)["regions"]
        assert {name: int(region["byte_size"]) for name, region in status.items()} == {
            "frames": frames.nbytes, "labels": expected.nbytes}
        frames_input = tritongrpc.InferInput("frames", list(frames.shape), "UINT8")
        frames_input.set_shared_memory("frames", frames.nbytes)
        labels_output = tritongrpc.InferRequestedOutput("labels")
        labels_output.set_shared_memory("labels", expected.nbytes)
        logits_output = tritongrpc.InferRequestedOutput("logits")  # asked for as bytes beside it
        result = client.infer("camvid", [frames_input], outputs=[labels_output, logits_output], headers=AUTH)
        answer = result.get_output("labels")  # the message (tritonclient 2.x's as_json=True here answers None)
        assert answer.parameters["shared_memory_region"].string_param == "labels"
        assert answer.parameters["shared_memory_byte_size"].int64_param == expected.nbytes
        assert len(result.get_response().raw_output_contents) == 1  # the logits' bytes only
        np.testing.assert_array_equal(result.as_numpy("logits").argmax(1), expected)
        labels = shm.get_contents_as_numpy(labels_segment, np.uint8, list(answer.shape))
        np.testing.assert_array_equal(labels, expected)
    finally:
        client.unregister_system_shared_memory(headers=AUTH)
    assert client.get_system_shared_memory_status(headers=AUTH, as_json=True).get("regions", {}) == {}


def test_shared_memory_misuse_over_grpc_is_refused_before_the_engine_runs(client, frames, segments):
    """A region too small for its output, an offset past a region, a size that is not the tensor's: each is
    refused naming it, and nothing was written into the region."""
    from tritonclient.utils import shared_memory as shm

    segment, key = segments("small", frames.nbytes)
    shm.set_shared_memory_region(segment, [np.ascontiguousarray(frames)])
    client.register_system_shared_memory("small", key, frames.nbytes, headers=AUTH)
    try:
        def refusal(input_size=frames.nbytes, input_offset=0, output_size=None):
            frames_input = tritongrpc.InferInput("frames", list(frames.shape), "UINT8")
            frames_input.set_shared_memory("small", input_size, offset=input_offset)
            outputs = []
            if output_size is not None:
                outputs = [tritongrpc.InferRequestedOutput("labels")]
                outputs[0].set_shared_memory("small", output_size, offset=frames.nbytes - output_size + 1)
            with pytest.raises(InferenceServerException) as refused:
                client.infer("camvid", [frames_input], outputs=outputs or None, headers=AUTH)
            return refused.value.message()

        assert "need" in refusal(input_size=frames.nbytes - 1)
        assert "runs past the end of region" in refusal(input_size=frames.nbytes - 1, input_offset=2) or \
            "need" in refusal(input_size=frames.nbytes - 1, input_offset=2)
        assert "runs past the end of region" in refusal(output_size=16)
        np.testing.assert_array_equal(shm.get_contents_as_numpy(segment, np.uint8, list(frames.shape)), frames)
    finally:
        client.unregister_system_shared_memory("small", headers=AUTH)


def test_direct_http_port_serves_the_routes_without_the_proxy(service, engine, frames):
    """`direct_port`: the ingress replica's own HTTP server answers the same routes as Serve's proxy (stock
    tritonclient.http, the API key, JSON errors), with the labels the proxy's route gives."""
    tritonhttp = pytest.importorskip("tritonclient.http")
    assert service.urls()["direct http"] == f"http://127.0.0.1:{service.config.direct_port}"
    direct = tritonhttp.InferenceServerClient(service.direct_url.split("://", 1)[1])
    assert direct.is_server_ready() and direct.is_model_ready("camvid", headers=AUTH)
    frames_input = tritonhttp.InferInput("frames", list(frames.shape), "UINT8")
    frames_input.set_data_from_numpy(frames)
    # a copy: tritonclient.http adds its own headers to the dict it is given
    labels = direct.infer("camvid", [frames_input], headers=dict(AUTH)).as_numpy("labels")
    proxied = OipClient(service.url, api_key=API_KEY).infer("camvid", {"frames": frames}, {"labels": True})
    np.testing.assert_array_equal(labels, proxied["labels"])
    np.testing.assert_array_equal(labels, engine.labels(engine.prepare(frames)))
    unauthorised = requests.get(f"{service.direct_url}/v2/models/camvid", timeout=30)
    assert unauthorised.status_code == 401 and "API key" in unauthorised.json()["error"]
    missing = requests.get(f"{service.direct_url}/v2/nowhere", headers=AUTH, timeout=30)
    assert missing.status_code == 404 and missing.json() == {"error": "no route GET /v2/nowhere"}


def test_the_api_key_is_required(client, stub):
    for headers in (None, {"authorization": "Bearer wrong"}, {"authorization": API_KEY}):
        with pytest.raises(InferenceServerException) as caught:
            client.get_model_metadata("camvid", headers=headers)
        assert caught.value.status() == "StatusCode.UNAUTHENTICATED", caught.value
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(good_request())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED and "API key" in caught.value.details()


def good_request(model="camvid") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="frames", datatype="UINT8", shape=[1, 32, 32, 3])
    request.raw_input_contents.append(bytes(32 * 32 * 3))
    request.outputs.add(name="labels")
    return request


def _edit(change):
    def build():
        request = good_request()
        change(request)
        return request
    return build


def _set(**fields):
    def change(request):
        tensor = request.inputs[0]
        for key, value in fields.items():
            if key == "shape":
                del tensor.shape[:]
                tensor.shape.extend(value)
            else:
                setattr(tensor, key, value)
    return change


def _raw(data: bytes):
    def change(request):
        request.raw_input_contents[0] = data
    return change


def _typed(field: str, values, datatype="UINT8", shape=(1, 32, 32, 3)):
    def change(request):
        del request.raw_input_contents[:]
        tensor = request.inputs[0]
        tensor.datatype = datatype
        del tensor.shape[:]
        tensor.shape.extend(shape)
        getattr(tensor.contents, field).extend(values)
    return change


def _second_input(request):
    request.inputs.add(name="images", datatype="FP32", shape=[1, 3, 32, 32])
    request.raw_input_contents.append(bytes(4 * 3 * 32 * 32))


def _nan_images(request):
    request.inputs[0].name, request.inputs[0].datatype = "images", "FP32"
    del request.inputs[0].shape[:]
    request.inputs[0].shape.extend([1, 3, 32, 32])
    request.raw_input_contents[0] = np.full((1, 3, 32, 32), np.nan, np.float32).tobytes()


def _fp16_images(request):
    request.inputs[0].name, request.inputs[0].datatype = "images", "FP16"
    del request.inputs[0].shape[:]
    request.inputs[0].shape.extend([1, 3, 32, 32])
    request.raw_input_contents[0] = np.zeros((1, 3, 32, 32), np.float16).tobytes()


def _shared_memory(request):
    request.inputs[0].parameters["shared_memory_region"].string_param = "frames0"
    request.inputs[0].parameters["shared_memory_byte_size"].int64_param = len(request.raw_input_contents[0])
    request.ClearField("raw_input_contents")


INVALID = grpc.StatusCode.INVALID_ARGUMENT
#: case -> (request builder, status, words the message must hold)
BAD_REQUESTS = {
    "unknown model": (lambda: good_request("nope"), grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"),
    "unknown version": (_edit(lambda r: setattr(r, "model_version", "7")), grpc.StatusCode.NOT_FOUND,
                        "no version '7'"),
    "no inputs": (_edit(lambda r: (r.ClearField("inputs"), r.ClearField("raw_input_contents"))), INVALID,
                  "at least one input"),
    "unknown datatype": (_edit(_set(datatype="FP33")), INVALID, "unknown datatype 'FP33'"),
    "wrong datatype for the input": (_edit(_set(datatype="INT8")), INVALID, "must be UINT8"),
    "raw of the wrong size": (_edit(_raw(bytes(100))), INVALID, "needs 3072"),
    "shape does not match raw": (_edit(_set(shape=[1, 32, 33, 3])), INVALID, "needs 3168"),
    "shape overflowing int64": (_edit(lambda r: (_set(shape=[2**32, 2**32])(r), _raw(b"")(r))), INVALID,
                                "dimension over"),
    "65 dimensions": (_edit(_set(shape=[1] * 65)), INVALID, "65 dimensions"),
    "negative dimension": (_edit(_set(shape=[1, -32, 32, 3])), INVALID, "negative dimension"),
    "3-D frames": (_edit(lambda r: (_set(shape=[32, 32, 3])(r))), INVALID, "must be 4-D"),
    "too small": (_edit(lambda r: (_set(shape=[1, 8, 8, 3])(r), _raw(bytes(192))(r))), INVALID, "smaller than"),
    "unknown input": (_edit(_set(name="pixels")), INVALID, "unknown input(s) ['pixels']"),
    "missing name": (_edit(_set(name="")), INVALID, "needs a name"),
    "two inputs": (_edit(_second_input), INVALID, "exactly one input"),
    "raw entries != inputs": (_edit(lambda r: r.raw_input_contents.append(b"x")), INVALID, "2 entries for 1 inputs"),
    "raw and contents": (_edit(lambda r: r.inputs[0].contents.uint_contents.append(1)), INVALID,
                         "both contents and raw_input_contents"),
    "no data at all": (_edit(lambda r: r.ClearField("raw_input_contents")), INVALID, "has 0 elements"),
    "typed count short": (_edit(_typed("uint_contents", [0] * 10)), INVALID, "has 10 elements"),
    "typed wrong field": (_edit(_typed("fp32_contents", [0.0] * 3072)), INVALID, "goes in contents.uint_contents"),
    "typed out of range": (_edit(_typed("uint_contents", [300] * 3072)), INVALID, "does not fit UINT8"),
    "FP16 typed": (_edit(_typed("fp32_contents", [0.0] * 3072, "FP16", (1, 3, 32, 32))), INVALID,
                   "FP16 travels only in raw_input_contents"),
    "FP16 raw for FP32 images": (_edit(_fp16_images), INVALID, "must be FP32, got FP16"),
    "NaN images": (_edit(_nan_images), INVALID, "NaN or infinite"),
    "unknown output": (_edit(lambda r: r.outputs.add(name="edges")), INVALID, "unknown output(s) ['edges']"),
    "output twice": (_edit(lambda r: r.outputs.add(name="labels")), INVALID, "requested twice"),
    "unregistered region": (_edit(_shared_memory), grpc.StatusCode.NOT_FOUND,
                            "no shared-memory region 'frames0' is registered"),
    "over the message limit": (_edit(_raw(bytes(MAX_BODY_MB * 1024 * 1024 + 1))), grpc.StatusCode.RESOURCE_EXHAUSTED,
                               ""),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_malformed_requests_get_a_clear_status_and_the_service_answers_on(stub, engine, case):
    build, status, words = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(build(), metadata=tuple(AUTH.items()), timeout=60)
    assert caught.value.code() == status, caught.value.details()
    assert words in caught.value.details(), caught.value.details()
    answer = stub.ModelInfer(good_request(), metadata=tuple(AUTH.items()), timeout=60)
    labels = np.frombuffer(answer.raw_output_contents[0], np.uint8).reshape(1, 32, 32)
    np.testing.assert_array_equal(labels, engine.labels(engine.prepare(np.zeros((1, 32, 32, 3), np.uint8))))


def test_unknown_model_ready_and_metadata_are_not_found(client):
    for call in (lambda: client.is_model_ready("nope", headers=AUTH),
                 lambda: client.get_model_metadata("camvid", "9", headers=AUTH)):
        with pytest.raises(InferenceServerException) as caught:
            call()
        assert caught.value.status() == "StatusCode.NOT_FOUND", caught.value


#: distinct malformed ModelInferRequests the fuzz test sends: every catalog form once (145), then combinations
GRPC_FUZZ_CASES = 160


def test_fuzzed_requests_get_a_status_naming_the_problem_and_the_service_answers_on(service, stub, engine):
    """`serving.fuzzing`'s malformed requests, as bytes (some are no message at all): none gets INTERNAL or
    UNKNOWN (the 500 of gRPC); each gets the status and words its case names; a good request after each is
    answered with the engine's labels."""
    expected = engine.labels(engine.prepare(np.zeros((1, SIDE, SIDE, 3), np.uint8)))
    failures = []
    with grpc.insecure_channel(service.grpc_address) as channel:
        send = channel.unary_unary(MODEL_INFER)  # bytes in, bytes out
        for case in malformed_grpc_requests("camvid", GRPC_FUZZ_CASES, seed=17):
            try:
                send(case.request, metadata=tuple(AUTH.items()), timeout=60)
                failures.append(f"{case.name}: answered OK")
            except grpc.RpcError as error:
                if error.code().name not in case.statuses or not re.search(case.says, error.details() or ""):
                    failures.append(f"{case.name}: {error.code().name} {(error.details() or '')[:200]!r}")
            answer = stub.ModelInfer(good_grpc_request("camvid"), metadata=tuple(AUTH.items()), timeout=60)
            labels = np.frombuffer(answer.raw_output_contents[0], np.uint8).reshape(expected.shape)
            if not np.array_equal(labels, expected):
                failures.append(f"after {case.name}: a good request got other labels")
    assert not failures, f"{len(failures)} of {GRPC_FUZZ_CASES}:\n" + "\n".join(failures[:20])
