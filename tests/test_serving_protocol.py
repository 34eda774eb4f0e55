"""The service's pieces that need no cluster: the OIP codec, request checks, configs, image answers, the
deploy files. The served application itself is tested over HTTP in test_serving.py."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from segmenters.data import dataset_classes
from segmenters.data.frames import ImageDecodeError, ImageTooLargeError, decode_image
from segmenters.spec import ModelSpec
from serving.config import ModelConfig, ServeConfig, load_serve_config
from serving.images import choose_output, class_areas, label_png
from serving.model import check_call
from serving.fuzzing import deep, mutated_request
from serving.protocol import (HEADER_LENGTH, ProtocolError, decode_infer_request, decode_infer_response,
                              encode_infer_request, encode_infer_response)

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)
#: a served model at the defaults (8 images a request, the default engine bytes a pixel), and the default budget
MODEL = ModelConfig(name="camvid", path="camvid.onnx")
REQUEST_BUDGET = ServeConfig(models=[MODEL]).request_budget_bytes


def _request(inputs, **kw):
    body, headers = encode_infer_request(inputs, **kw)
    return decode_infer_request(body, headers.get(HEADER_LENGTH))


@pytest.mark.parametrize("binary", [True, False])
def test_every_datatype_round_trips(binary):
    inputs = {
        "f32": RNG.standard_normal((2, 3, 4)).astype(np.float32),
        "f16": RNG.standard_normal((5,)).astype(np.float16),
        "f64": RNG.standard_normal((1, 2)),
        "u8": RNG.integers(0, 255, (2, 2, 3), dtype=np.uint8),
        "i64": RNG.integers(-2**40, 2**40, (3,)),
        "i32": RNG.integers(-100, 100, (3, 1), dtype=np.int32),
        "b": np.array([True, False, True]),
        "s": np.array([b"patch", b"", b"watch"], dtype=object),
    }
    parsed = _request(inputs, binary_inputs=binary)
    assert list(parsed.inputs) == list(inputs)
    for name, array in inputs.items():
        got = parsed.inputs[name]
        assert got.shape == array.shape, name
        if array.dtype == object:
            assert list(got.reshape(-1)) == list(array.reshape(-1))
        else:
            assert got.dtype == array.dtype, name
            np.testing.assert_array_equal(got, array)


def test_json_data_may_be_nested_or_flat():
    array = np.arange(12, dtype=np.float32).reshape(1, 3, 2, 2)
    for data in (array.tolist(), array.reshape(-1).tolist()):
        body = json.dumps({"inputs": [{"name": "images", "shape": [1, 3, 2, 2], "datatype": "FP32", "data": data}]})
        np.testing.assert_array_equal(decode_infer_request(body.encode()).inputs["images"], array)


def test_outputs_and_binary_flags():
    body = json.dumps({"id": "r1", "parameters": {"binary_data_output": True},
                       "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],
                       "outputs": [{"name": "labels"}, {"name": "logits", "parameters": {"binary_data": False}}]})
    parsed = decode_infer_request(body.encode())
    assert parsed.id == "r1" and parsed.binary_output
    assert [(o.name, o.binary) for o in parsed.outputs] == [("labels", True), ("logits", False)]
    assert decode_infer_request(body.replace(', "outputs"', ', "x"').encode()).outputs is None


def test_response_wire_format():
    logits = RNG.standard_normal((1, 2, 3, 3)).astype(np.float32)
    labels = logits.argmax(1).astype(np.uint8)
    body, headers = encode_infer_response("m", "3", [("logits", logits, True), ("labels", labels, False)], "id7")
    assert headers["Content-Type"] == "application/octet-stream"
    length = int(headers[HEADER_LENGTH])
    header = json.loads(body[:length])
    assert header["model_name"] == "m" and header["model_version"] == "3" and header["id"] == "id7"
    assert header["outputs"][0] == {"name": "logits", "datatype": "FP32", "shape": [1, 2, 3, 3],
                                    "parameters": {"binary_data_size": logits.nbytes}}
    assert header["outputs"][1]["data"] == labels.reshape(-1).tolist()
    assert body[length:] == logits.tobytes()  # little-endian, row-major, no padding
    _, arrays = decode_infer_response(body, length)
    np.testing.assert_array_equal(arrays["logits"], logits)
    json_body, json_headers = encode_infer_response("m", "1", [("labels", labels, False)])
    assert json_headers == {"Content-Type": "application/json"} and json.loads(json_body)["outputs"][0]["data"]


def _binary_body(header: dict, blob: bytes) -> tuple[bytes, str]:
    text = json.dumps(header).encode()
    return text + blob, str(len(text))


@pytest.mark.parametrize("case, message", [
    ("not json", "not valid JSON"),
    ("no inputs", "non-empty 'inputs'"),
    ("bad datatype", "unknown datatype 'FP8'"),
    ("negative shape", "negative dimension"),
    ("count mismatch", "data has 5 elements, shape [2, 3] needs 6"),
    ("strings as numbers", "not a list of FP32 numbers"),
    ("duplicate input", "given twice"),
    ("no data", "neither 'data' nor"),
    ("binary too short", "needs 24"),
    ("binary past end", "runs past the end"),
    ("extra binary", "binary bytes that no input"),
    ("binary without header", "needs the Inference-Header-Content-Length header"),
    ("header length too long", "the body has"),
    ("header length not a number", "must be an integer"),
    ("bad binary flag", "binary_data must be true or false"),
])
def test_malformed_requests_name_the_problem(case, message):
    tensor = {"name": "x", "shape": [2, 3], "datatype": "FP32"}
    header_length = None
    if case == "not json":
        body = b"{inputs: nope"
    elif case == "no inputs":
        body = b'{"inputs": []}'
    elif case == "bad datatype":
        body = json.dumps({"inputs": [{**tensor, "datatype": "FP8", "data": [0] * 6}]}).encode()
    elif case == "negative shape":
        body = json.dumps({"inputs": [{**tensor, "shape": [-1, 3], "data": [0] * 3}]}).encode()
    elif case == "count mismatch":
        body = json.dumps({"inputs": [{**tensor, "data": [0] * 5}]}).encode()
    elif case == "strings as numbers":
        body = json.dumps({"inputs": [{**tensor, "data": ["a"] * 6}]}).encode()
    elif case == "duplicate input":
        body = json.dumps({"inputs": [{**tensor, "data": [0] * 6}] * 2}).encode()
    elif case == "no data":
        body = json.dumps({"inputs": [tensor]}).encode()
    elif case == "bad binary flag":
        body = json.dumps({"inputs": [{**tensor, "data": [0] * 6}],
                           "outputs": [{"name": "labels", "parameters": {"binary_data": "yes"}}]}).encode()
    else:
        sizes = {"binary too short": (20, 20), "binary past end": (24, 10), "extra binary": (24, 30),
                 "binary without header": (24, 24), "header length too long": (24, 24),
                 "header length not a number": (24, 24)}[case]
        body, header_length = _binary_body({"inputs": [{**tensor, "parameters": {"binary_data_size": sizes[0]}}]},
                                           b"\0" * sizes[1])
        header_length = {"binary without header": None, "header length too long": str(len(body) + 1),
                         "header length not a number": "12abc"}.get(case, header_length)
    with pytest.raises(ProtocolError, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        decode_infer_request(body, header_length)
    assert info.value.status == 400


def _json_tensor(**fields) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [0] * 6,
                                   **fields}]}).encode()


# Each of these answered 500 once (issue 17's fuzz run): shapes whose element count overflowed int64 to 0, a
# 65-dimension shape, a datatype that is not a string, JSON nested ~1000 or 100000 deep; and ragged data was taken.
@pytest.mark.parametrize("case, message", [
    ("count overflows int64, JSON", "over 2147483647"),
    ("count overflows int64, binary", "over 2147483647"),
    ("huge dims, nothing in them", "cannot be held"),
    ("65 dimensions", "65 dimensions, more than the 16"),
    ("datatype is a list", "unknown datatype ['FP32']"),
    ("datatype is an object", "unknown datatype {}"),
    ("data nested 900 deep", "nested deeper than the shape's 1 dimensions"),
    ("body nested 100000 deep", "nested too deeply"),
    ("data nested 100000 deep", "nested too deeply"),
    ("ragged data of the right count", "ragged"),
    ("nested other than the shape", "nested as [3, 2]"),
    ("data is not a list", "'data' must be a list"),
    ("null in the data", "holds null"),
    ("NaN in the data", "NaN is not JSON"),
    ("BYTES nested too deep", "BYTES data is nested deeper"),
    ("BYTES holds a number", "BYTES data must be strings, got 7"),
])
def test_hostile_shapes_and_nesting_are_refused_without_a_crash(case, message):
    header_length = None
    if case == "count overflows int64, JSON":
        body = _json_tensor(shape=[2**32, 2**32], data=[])
    elif case == "count overflows int64, binary":
        body, header_length = _binary_body({"inputs": [{"name": "x", "shape": [2**62, 4], "datatype": "FP32",
                                                        "parameters": {"binary_data_size": 0}}]}, b"")
    elif case == "huge dims, nothing in them":
        body = _json_tensor(shape=[0] + [2**31 - 1] * 4, data=[])
    elif case == "65 dimensions":
        body = _json_tensor(shape=[1] * 65, data=[0])
    elif case == "datatype is a list":
        body = _json_tensor(datatype=["FP32"])
    elif case == "datatype is an object":
        body = _json_tensor(datatype={})
    elif case == "data nested 900 deep":
        body = _json_tensor(shape=[1]).replace(b"[0, 0, 0, 0, 0, 0]", deep(900).encode())
    elif case == "body nested 100000 deep":
        body = deep(100000).encode()
    elif case == "data nested 100000 deep":
        body = _json_tensor(shape=[1]).replace(b"[0, 0, 0, 0, 0, 0]", deep(100000).encode())
    elif case == "ragged data of the right count":
        body = _json_tensor(shape=[1, 3, 32, 32], data=[[0.0] * 3000, [0.0] * 72])
    elif case == "nested other than the shape":
        body = _json_tensor(data=[[0, 0], [0, 0], [0, 0]])
    elif case == "data is not a list":
        body = _json_tensor(data=5)
    elif case == "null in the data":
        body = _json_tensor(data=[[0, 0, None], [0, 0, 0]])
    elif case == "NaN in the data":
        body = _json_tensor(data=[0, 0, float("nan"), 0, 0, 0])
    elif case == "BYTES nested too deep":
        body = _json_tensor(shape=[2], datatype="BYTES", data=[["a"], ["b"]])
    else:
        body = _json_tensor(shape=[2], datatype="BYTES", data=["a", 7])
    with pytest.raises(ProtocolError, match=re.escape(message)) as info:
        decode_infer_request(body, header_length)
    assert info.value.status == 400


def test_a_huge_name_is_not_echoed_whole():
    name = "n" * (20 << 20)
    body = json.dumps({"inputs": [{"name": name, "shape": [2], "datatype": "FP8", "data": [0, 0]}]}).encode()
    with pytest.raises(ProtocolError, match="unknown datatype") as info:
        decode_infer_request(body)
    assert len(info.value.message) < 400 and f"({len(repr(name))} characters)" in info.value.message


def test_bytes_may_be_nested_as_the_shape():
    body = _json_tensor(shape=[2, 1], datatype="BYTES", data=[["a"], ["b"]])
    assert decode_infer_request(body).inputs["x"].reshape(-1).tolist() == [b"a", b"b"]


@pytest.mark.parametrize("inputs, outputs, message, status", [
    ({"images": np.zeros((1, 3, 64, 64), np.float32), "frames": np.zeros((1, 64, 64, 3), np.uint8)}, (),
     "exactly one input", 400),
    ({"pixels": np.zeros((1, 3, 64, 64), np.float32)}, (), "unknown input", 400),
    ({"images": np.zeros((1, 3, 64, 64), np.uint8)}, (), "must be FP32, got UINT8", 400),
    ({"frames": np.zeros((1, 64, 64, 3), np.float32)}, (), "must be UINT8, got FP32", 400),
    ({"images": np.zeros((3, 64, 64), np.float32)}, (), "4-D NCHW", 400),
    ({"images": np.zeros((1, 4, 64, 64), np.float32)}, (), "3 channels", 400),
    ({"frames": np.zeros((1, 64, 64, 4), np.uint8)}, (), "3 channels", 400),
    ({"images": np.zeros((9, 3, 64, 64), np.float32)}, (), "at most 8", 400),
    ({"images": np.zeros((1, 3, 16, 64), np.float32)}, (), "smaller than 32", 400),
    ({"images": np.zeros((1, 3, 2048, 2048), np.float32)}, (), "over the limit", 413),
    ({"images": np.full((1, 3, 64, 64), np.nan, np.float32)}, (), "NaN", 400),
    ({"images": np.zeros((1, 3, 64, 64), np.float32)}, ("probabilities",), "unknown output", 400),
])
def test_calls_that_do_not_fit_the_model(inputs, outputs, message, status):
    with pytest.raises(ProtocolError, match=message) as info:
        check_call(inputs, outputs, MODEL, REQUEST_BUDGET)
    assert info.value.status == status


def test_a_good_call_defaults_to_every_output():
    call = check_call({"frames": np.zeros((2, 40, 50, 3), np.uint8)}, (), MODEL, REQUEST_BUDGET)
    assert call.outputs == ("logits", "labels") and call.images == 2


def test_config_rules(tmp_path):
    model = {"name": "camvid", "path": "m.onnx"}
    with pytest.raises(ValueError, match="not loopback"):
        ServeConfig(models=[model], host="0.0.0.0")
    assert ServeConfig(models=[model], host="0.0.0.0", api_key_env="KEY").host == "0.0.0.0"
    with pytest.raises(ValueError, match="TensorRT plan needs num_gpus"):
        ServeConfig(models=[{**model, "path": "m.plan"}])
    with pytest.raises(ValueError, match="listed twice"):
        ServeConfig(models=[model, model])
    with pytest.raises(ValueError, match="not an engine file"):
        ServeConfig(models=[{**model, "path": "m.pt"}])
    config = ServeConfig(models=[{**model, "version": v} for v in ("2", "10", "9")] + [{"name": "x", "path": "x.onnx"}])
    assert config.default_versions() == {"camvid": "10", "x": "1"}
    unset = ServeConfig(models=[model], api_key_env="PATCHWATCH_TEST_UNSET_KEY")
    with pytest.raises(ValueError, match="unset or empty"):
        unset.api_key()


def test_deploy_files_agree_and_validate():
    from ray.serve.schema import ServeDeploySchema

    serve_file = yaml.safe_load((ROOT / "deploy/serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(serve_file)  # what `serve deploy` checks
    config = load_serve_config(ROOT / "deploy/serve_config.yaml")
    assert (config.host, config.port) == (serve_file["http_options"]["host"], serve_file["http_options"]["port"])
    assert config.api_key_env, "the cluster config binds 0.0.0.0, so it must require a key"

    service = yaml.safe_load((ROOT / "deploy/rayservice.yaml").read_text())
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    assert yaml.safe_load(service["spec"]["serveConfigV2"])["applications"] == serve_file["applications"]
    cluster = service["spec"]["rayClusterConfig"]
    gpus = [g for g in cluster["workerGroupSpecs"]
            if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")]
    assert gpus, "the RayService needs a GPU worker group"
    dockerfile = (ROOT / "deploy/Dockerfile").read_text()
    assert f"rayproject/ray:{cluster['rayVersion']}" in dockerfile


def test_strict_image_decoding():
    rgb = RNG.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    for fmt in ("PNG", "JPEG"):
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format=fmt)
        data = buffer.getvalue()
        decoded = decode_image(data)
        assert decoded.shape == (40, 60, 3) and decoded.dtype == np.uint8
        with pytest.raises(ImageDecodeError, match="truncated"):
            decode_image(data[: len(data) // 2])
        with pytest.raises(ImageTooLargeError, match="over the limit"):
            decode_image(data, max_pixels=1000)
    with pytest.raises(ImageDecodeError, match="not a recognised image"):
        decode_image(b"GIF89a but not really" * 10)
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(b"")


def test_image_answers():
    spec = ModelSpec(arch="unet", classes=dataset_classes("camvid"), input_size=(64, 64), dataset="camvid")
    labels = RNG.integers(0, spec.num_classes, (30, 40)).astype(np.uint8)
    png = Image.open(io.BytesIO(label_png(labels, spec)))
    assert png.mode == "P"
    np.testing.assert_array_equal(np.asarray(png), labels)  # pixel values are class indices
    palette = np.array(png.getpalette()[: 3 * spec.num_classes]).reshape(-1, 3)
    np.testing.assert_array_equal(palette, spec.palette())
    areas = class_areas(labels, spec)
    assert [c["name"] for c in areas["classes"]] == spec.class_names
    assert sum(c["pixels"] for c in areas["classes"]) == labels.size
    assert areas["classes"][3]["pixels"] == int((labels == 3).sum())
    assert choose_output(None, "application/json") == "areas" and choose_output(None, None) == "labels"
    assert choose_output("overlay", "application/json") == "overlay"
    with pytest.raises(ProtocolError, match="not one of"):
        choose_output("mask", None)


def test_mutated_requests_get_a_protocol_error_or_an_answer_never_a_crash():
    """2000 requests, each a valid one with 1-3 fields replaced by garbage: decoding and checking them against
    the model either works or raises `ProtocolError` (a 4xx), nothing else (the server's 500)."""
    rng = np.random.default_rng(17)
    refused = 0
    for _ in range(2000):
        request = mutated_request(rng)
        try:
            parsed = decode_infer_request(json.dumps(request).encode())
            wanted = tuple(o.name for o in parsed.outputs) if parsed.outputs is not None else ()
            check_call(parsed.inputs, wanted, MODEL, REQUEST_BUDGET)
        except ProtocolError as exc:
            assert 400 <= exc.status < 500, exc.message
            refused += 1
    assert refused > 1500  # the garbage really was garbage


def test_malformed_grpc_requests_get_a_protocol_error_naming_the_problem():
    """2000 distinct malformed ModelInferRequests (`serving.fuzzing`'s catalog, then combinations), decoded and
    checked as the gRPC service does: each is refused with the status and words its case names, none crashes."""
    from tritonclient.grpc import service_pb2 as pb

    from serving.fuzzing import malformed_grpc_requests
    from serving.grpc_service import lenient_parser, Undecodable, check_infer_request, grpc_status
    from serving.shared_memory import SharedMemoryRegistry

    failures = []
    for case in malformed_grpc_requests(MODEL.name, 2000, seed=17):
        request = lenient_parser(pb.ModelInferRequest)(case.request)
        try:
            if isinstance(request, Undecodable):
                raise ProtocolError(f"the request is not a valid {request.message_type} message: {request.error}")
            if request.model_name != MODEL.name or request.model_version not in ("", MODEL.version):
                continue  # the served model's lookup, tested against the service in test_serving_grpc.py
            check_infer_request(request, MODEL, REQUEST_BUDGET, SharedMemoryRegistry(REQUEST_BUDGET))
            failures.append(f"{case.name}: accepted")
        except ProtocolError as exc:
            if grpc_status(exc).name not in case.statuses or not re.search(case.says, exc.message):
                failures.append(f"{case.name}: {grpc_status(exc).name} {exc.message[:200]!r}")
    assert not failures, "\n".join(failures[:20])


def test_json_answers_are_held_to_the_request_budget():
    """Logits as JSON cost Python objects and text per value: a frame whose binary answer is fine is refused as
    JSON when that would pass the budget, with a 413 saying to ask for binary."""
    from serving.model import JSON_BYTES_PER_VALUE, check_json_outputs

    logits = np.zeros((1, 12, 512, 512), np.float32)
    budget = logits.size * JSON_BYTES_PER_VALUE - 1
    check_json_outputs([("logits", logits, True), ("labels", np.zeros((1, 512, 512), np.uint8), False)], budget)
    with pytest.raises(ProtocolError, match="'logits' of shape \\[1, 12, 512, 512\\] as JSON.*binary_data: true") as info:
        check_json_outputs([("logits", logits, False)], budget)
    assert info.value.status == 413


def test_segment_slices_are_checked_against_the_segment_as_it_is_now(tmp_path):
    """What a model replica reads and writes (`SegmentSlice`): only inside the slice, and a segment the client shrank
    or removed after registering is an error naming it, never a read past the end of the file (a bus error)."""
    from serving.shared_memory import SegmentSlice, SharedMemoryRegistry

    segment = tmp_path / "frames-segment"
    segment.write_bytes(bytes(range(64)))
    registry = SharedMemoryRegistry(max_bytes=1024, root=tmp_path)
    registry.register("frames", {"key": "/frames-segment", "offset": 16, "byte_size": 32})
    piece = registry.segment_slice({"shared_memory_region": "frames", "shared_memory_byte_size": 8,
                                    "shared_memory_offset": 4}, "input 'frames'", "node-a")
    assert piece == SegmentSlice("/frames-segment", 20, 8, "node-a")
    assert piece.read(root=tmp_path) == bytes(range(20, 28))
    piece.write(b"\xff" * 8, "output 'labels'", root=tmp_path)
    assert segment.read_bytes()[18:30] == bytes([18, 19]) + b"\xff" * 8 + bytes([28, 29])
    with pytest.raises(ProtocolError, match="9 bytes, more than its shared_memory_byte_size of 8"):
        piece.write(b"\x00" * 9, "output 'labels'", root=tmp_path)
    with pytest.raises(ProtocolError, match="runs past the end of region 'frames'"):
        registry.segment_slice({"shared_memory_region": "frames", "shared_memory_byte_size": 30,
                                "shared_memory_offset": 4}, "output 'labels'", "node-a")
    registry.close()
    segment.write_bytes(bytes(24))  # shrunk under the registration
    with pytest.raises(ProtocolError, match="holds 24 bytes now, less than its region needs \\(28\\)"):
        piece.read(root=tmp_path)
    segment.unlink()
    with pytest.raises(ProtocolError, match="cannot be opened any more"):
        piece.read(root=tmp_path)


def test_which_calls_travel_to_the_replica_by_value():
    """Label maps of small frames go by value over the replica's gRPC channel; logits, and frames over
    `BY_VALUE_MAX_BYTES`, as Ray actor calls; a call whose frame and labels are in shared memory carries neither."""
    from serving.model import BY_VALUE_MAX_BYTES, InferCall
    from serving.shared_memory import SegmentSlice

    small = InferCall("frames", np.zeros((1, 64, 64, 3), np.uint8), ("labels",))
    assert small.by_value and not InferCall("frames", small.array, ("logits", "labels")).by_value
    side = int((BY_VALUE_MAX_BYTES / 4) ** 0.5) + 1  # 3 bytes a pixel in, 1 out: just over the limit
    assert not InferCall("frames", np.zeros((1, side, side, 3), np.uint8), ("labels",)).by_value
    big = InferCall("frames", np.zeros((1, 720, 960, 3), np.uint8), ("logits",))
    frames_slice, logits_slice = SegmentSlice("/f", 0, big.array.nbytes, "n"), SegmentSlice("/l", 0, 1, "n")
    in_transit = big.through_segments(frames_slice, {"logits": logits_slice}).in_transit()
    assert in_transit.array is None and in_transit.shape == (1, 720, 960, 3) and in_transit.by_value
    assert in_transit.memory_bytes(10) == big.memory_bytes(10)
    assert big.through_segments(frames_slice, {"logits": logits_slice}).with_data() == big
