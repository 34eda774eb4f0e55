"""Google's trained MediaPipe selfie segmenters, taken from the `mediapipe` wheel on the package registry.

The wheel (`mediapipe==0.10.21`) ships two trained two-class (background, person) TFLite models under
`mediapipe/modules/selfie_segmentation/`: `selfie_segmentation.tflite` ("general", 256x256 input) and
`selfie_segmentation_landscape.tflite` ("landscape", 144x256), with the CPU graph that runs them,
`selfie_segmentation_cpu.binarypb`. The wheel is downloaded with pip (`pip download --no-deps`, never installed:
mediapipe pins numpy<2 and opencv-contrib) into a cache folder, and only the members needed are extracted.

The input convention in `specs/mediapipe_selfie*.yaml` is MediaPipe's own: the graph feeds the model through an
`ImageToTensorCalculator` (options decoded below from the binarypb, field numbers from the wheel's own
`image_to_tensor_calculator_pb2` descriptor): general 256x256 / landscape 256 wide x 144 high,
`keep_aspect_ratio: false` (the whole image is stretched to that size), `output_tensor_float_range {min: 0
max: 1}` (RGB scaled to [0, 1], no mean/std), `border_mode: BORDER_ZERO`; the solution's API takes RGB images.
Its `TensorsToSegmentationCalculator` has `activation: NONE`: the model's output is already a probability
(the TFLite graph ends in LOGISTIC), resized back to the image's size.
"""

from __future__ import annotations

import hashlib
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

from segmenters.files import atomic_write_bytes

#: the pinned wheel; its files on the registry are immutable, so the members' digests below are pinned too
MEDIAPIPE_VERSION = "0.10.21"
#: one fixed wheel whatever the host (the models are the same in every platform's wheel): pip fetches it anywhere
WHEEL_TAGS = ("--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
              "--platform", "manylinux_2_28_x86_64")
MODULE_DIR = "mediapipe/modules/selfie_segmentation"
GRAPH_MEMBER = f"{MODULE_DIR}/selfie_segmentation_cpu.binarypb"

#: variant -> (wheel member, (height, width) of its input, sha256 of the member)
VARIANTS: dict[str, tuple[str, tuple[int, int], str]] = {
    "general": ("selfie_segmentation.tflite", (256, 256),
                "9ee168ec7c8f2a16c56fe8e1cfbc514974cbbb7e434051b455635f1bd1462f5c"),
    "landscape": ("selfie_segmentation_landscape.tflite", (144, 256),
                  "a77d03f4659b9f6b6c1f5106947bf40e99d7655094b6527f214ea7d451106edd"),
}
#: the graph's SwitchContainer picks its contained ImageToTensorCalculator by model_selection: 0 general, 1 landscape
MODEL_SELECTION = {"general": 0, "landscape": 1}
SPEC_FILES = {"general": "mediapipe_selfie.yaml", "landscape": "mediapipe_selfie_landscape.yaml"}
SPEC_DIR = Path(__file__).resolve().parent / "specs"


class MediaPipeFetchError(RuntimeError):
    """The MediaPipe wheel or its model could not be obtained or is not what was expected."""


class RegistryUnreachableError(MediaPipeFetchError):
    """pip could not reach the package registry (offline, proxy, timeout)."""


_NETWORK_SIGNS = ("connection", "timed out", "timeout", "temporary failure in name resolution", "name or service",
                  "network is unreachable", "max retries exceeded", "proxyerror", "ssl", "no route to host")


def _check_variant(variant: str) -> tuple[str, tuple[int, int], str]:
    if variant not in VARIANTS:
        raise ValueError(f"unknown selfie segmenter variant {variant!r}; choose from {sorted(VARIANTS)}")
    return VARIANTS[variant]


def _wheel(cache_dir: Path, timeout: float) -> Path:
    """The cached wheel, downloaded with pip if it is not there yet."""
    pattern = f"mediapipe-{MEDIAPIPE_VERSION}-*.whl"
    found = sorted(cache_dir.glob(pattern))
    if found:
        return found[0]
    command = [sys.executable, "-m", "pip", "download", f"mediapipe=={MEDIAPIPE_VERSION}", "--no-deps",
               "--only-binary=:all:", *WHEEL_TAGS, "-d", str(cache_dir), "--timeout", str(int(timeout)),
               "--retries", "1", "--disable-pip-version-check", "--no-input"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=max(60.0, 10 * timeout))
    except subprocess.TimeoutExpired as exc:
        raise RegistryUnreachableError(
            f"pip could not download mediapipe=={MEDIAPIPE_VERSION} from the package registry in time "
            f"({exc.timeout:.0f} s): is the registry reachable?") from exc
    found = sorted(cache_dir.glob(pattern))
    if done.returncode != 0 or not found:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-6:])
        kind = RegistryUnreachableError if any(s in tail.lower() for s in _NETWORK_SIGNS) else MediaPipeFetchError
        reason = ("pip could not reach the package registry" if kind is RegistryUnreachableError
                  else "pip could not download it")
        raise kind(f"mediapipe=={MEDIAPIPE_VERSION}: {reason} (exit {done.returncode}):\n{tail}")
    return found[0]


def _extract(cache_dir: Path, member: str, digest: str | None, timeout: float) -> Path:
    target = cache_dir / f"mediapipe-{MEDIAPIPE_VERSION}" / Path(member).name
    if target.is_file() and (digest is None or hashlib.sha256(target.read_bytes()).hexdigest() == digest):
        return target
    wheel = _wheel(cache_dir, timeout)
    try:
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(member)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise MediaPipeFetchError(f"{wheel}: cannot read {member}: {exc}") from exc
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:
        raise MediaPipeFetchError(f"{wheel}: {member} has sha256 {hashlib.sha256(data).hexdigest()}, "
                                  f"expected {digest} (mediapipe=={MEDIAPIPE_VERSION})")
    return atomic_write_bytes(target, data)


def fetch_selfie_tflite(cache_dir: Path, variant: str = "general", *, timeout: float = 30.0) -> Path:
    """Path of the selfie segmenter's .tflite, extracted into `cache_dir` (reused when already there)."""
    member, _, digest = _check_variant(variant)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = _extract(cache_dir, f"{MODULE_DIR}/{member}", digest, timeout)
    if path.read_bytes()[4:8] != b"TFL3":
        raise MediaPipeFetchError(f"{path} is not a TFLite flatbuffer (no TFL3 identifier)")
    return path


def fetch_selfie_graph(cache_dir: Path, *, timeout: float = 30.0) -> Path:
    """Path of MediaPipe's CPU graph for the selfie segmenters (`selfie_segmentation_cpu.binarypb`)."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    return _extract(cache_dir, GRAPH_MEMBER, None, timeout)


# ---- the graph's preprocessing, read from the binarypb (raw protobuf wire format: mediapipe is not installed) ----
_NODE, _CALCULATOR, _NODE_OPTIONS = 1, 2, 7  # CalculatorGraphConfig.node; Node.calculator; Node.node_options
_SWITCH_EXT, _CONTAINED_NODE = 345967970, 2  # SwitchContainerOptions.ext; .contained_node
_IMAGE_TO_TENSOR_EXT = 334361939  # ImageToTensorCalculatorOptions.ext
_SEGMENTATION_EXT = 374311106  # TensorsToSegmentationCalculatorOptions.ext (mediapipe/calculators/tensor)


def _fields(buf: bytes) -> list[tuple[int, int | float | bytes]]:
    """(field number, value) pairs of one protobuf message: varints as int, 32-bit as float, bytes as bytes."""
    out, i = [], 0

    def varint() -> int:
        nonlocal i
        value = shift = 0
        while True:
            byte = buf[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while i < len(buf):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            out.append((number, varint()))
        elif wire == 5:
            out.append((number, struct.unpack("<f", buf[i:i + 4])[0]))
            i += 4
        elif wire == 1:
            out.append((number, struct.unpack("<d", buf[i:i + 8])[0]))
            i += 8
        elif wire == 2:
            size = varint()
            out.append((number, buf[i:i + size]))
            i += size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    return out


def _get(buf: bytes, number: int, default=None):
    return next((v for n, v in _fields(buf) if n == number), default)


def selfie_graph_options(graph: Path) -> dict[str, dict]:
    """What MediaPipe's CPU graph does around each variant's model: input size, aspect, value range, activation."""
    nodes = [v for n, v in _fields(Path(graph).read_bytes()) if n == _NODE]
    by_name = {_get(node, _CALCULATOR, b"").decode(): node for node in nodes}
    switch = _get(_get(by_name["SwitchContainer"], _NODE_OPTIONS), _SWITCH_EXT)
    contained = [v for n, v in _fields(switch) if n == _CONTAINED_NODE]
    activation = _get(_get(by_name["TensorsToSegmentationCalculator"], _NODE_OPTIONS), _SEGMENTATION_EXT)
    activation = ("NONE", "SIGMOID", "SOFTMAX")[_get(activation, 2, 0)]
    options = {}
    for variant, index in MODEL_SELECTION.items():
        node = contained[index]
        assert _get(node, _CALCULATOR) == b"ImageToTensorCalculator"
        itt = _get(_get(node, _NODE_OPTIONS), _IMAGE_TO_TENSOR_EXT)
        float_range = _get(itt, 4)
        options[variant] = {
            "size": (_get(itt, 2), _get(itt, 1)),  # (output_tensor_height, output_tensor_width)
            "keep_aspect_ratio": bool(_get(itt, 3, 0)),
            "value_range": (_get(float_range, 1, 0.0), _get(float_range, 2, 0.0)) if float_range else None,
            "border_mode": ("BORDER_UNSPECIFIED", "BORDER_ZERO", "BORDER_REPLICATE")[_get(itt, 6, 0)],
            "activation": activation,
        }
    return options


def selfie_spec_path(variant: str = "general") -> Path:
    _check_variant(variant)
    return SPEC_DIR / SPEC_FILES[variant]


def selfie_import_spec(variant: str = "general") -> dict:
    """The committed sidecar of the converted selfie segmenter, validated, as a plain dict."""
    from segmenters.importing.spec import read_import_spec

    path = selfie_spec_path(variant)
    read_import_spec(path)
    return yaml.safe_load(path.read_text())
