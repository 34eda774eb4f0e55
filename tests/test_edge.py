"""Edge bundles: sign, verify (and refuse each kind of tampering with its own error), and run without Ray."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2.functional import resize

from edge import (
    BundleDigestError, BundleError, BundleKeyError, BundleMissingFileError, BundleSignatureError,
    BundleTargetError, BundleUnexpectedFileError, create_bundle, generate_keypair, run_bundle, verify_bundle,
)
from edge.runner import run_engine, select_engine
from edge.signing import KeyFileError
from export import OnnxRuntimeEngine
from export.parity import TOLERANCES
from export.pipeline import ParitySettings, export_onnx_gated, report_paths
from export.tensorrt_engine import PlanInfo, PlanTarget, sidecar_path

pytestmark = pytest.mark.data
ORIN = PlanTarget(tensorrt_version="10.3.0", compute_capability="8.7", device_name="Orin")


@pytest.fixture(scope="module")
def engines(tmp_path_factory, camvid_unet):
    """Gated fp32 + fp16 ONNX of the trained CamVid U-Net, and a signing key pair."""
    checkpoint, twin = camvid_unet
    folder = tmp_path_factory.mktemp("engines")
    export_onnx_gated(checkpoint, folder / "unet.onnx", precisions=("fp16",), settings=ParitySettings(count=4),
                      progress=False)
    private, public = generate_keypair(folder / "keys")
    return folder, twin, private, public


@pytest.fixture
def bundle(engines, tmp_path):
    folder, _, private, _ = engines
    return create_bundle(tmp_path / "bundle", [folder / "unet.onnx", folder / "unet.fp16.onnx"], private)


def test_round_trip_bundle_verify_run_reproduces_the_twins_labels_on_camvid_val(engines, bundle, data_root, tmp_path):
    _, twin, _, public = engines
    val = data_root / "camvid" / "val"
    summary = run_bundle(bundle, public, str(val), tmp_path / "out", limit=6, progress=False)
    assert summary["frames"] == 6 and summary["errors"] == []
    assert summary["engine"]["backend"] == "onnxruntime:CPUExecutionProvider"
    assert summary["engine"]["precision"] == "fp32"  # the most exact engine by default
    assert summary["segmented_at"] == list(twin.spec.input_size) == [96, 128]  # the spec's size, as eval
    compared = 0
    for path in sorted(val.glob("*.png"))[:6]:
        written = np.asarray(Image.open(tmp_path / "out" / "labels" / f"{path.stem}.png"))
        assert written.shape == (360, 480)  # the frame's size
        assert_twin_labels(written, twin_logits_at_spec_size(twin, path))
        assert (tmp_path / "out" / "overlays" / f"{path.stem}.png").is_file()
        compared += 1
    assert compared == 6 and len(np.unique(written)) > 1
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["bundle"]["signer"].startswith("p256:")


def twin_logits_at_spec_size(twin, path) -> np.ndarray:
    """The twin's logits on the image file at its spec's input size, the frame resized as eval resizes
    (torchvision bilinear, antialiased) from its uint8 pixels."""
    frame = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    resized = resize(frame, list(twin.spec.input_size), antialias=True)
    with torch.no_grad():
        return twin.logits(resized[None].float() / 255.0)[0].numpy()


def spread_to(model_labels: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Labels at the model's size -> `size`: every frame pixel takes the label of the model pixel whose
    footprint holds its centre (torch's nearest-exact)."""
    spread = torch.nn.functional.interpolate(torch.from_numpy(model_labels.astype(np.float32))[None, None],
                                             size=tuple(size), mode="nearest-exact")
    return spread[0, 0].numpy().astype(model_labels.dtype)


def assert_twin_labels(written: np.ndarray, logits: np.ndarray) -> None:
    """`written` (at a frame's size) shows the twin's labels of `logits` (at the spec's size) spread to it. Every
    label the twin is sure of is reproduced; only a near-tie (top-2 margin inside the fp32 gate's logit
    tolerance, counted twice: both logits may move) may resolve the other way in another runtime."""
    expected = spread_to(logits.argmax(0), written.shape)
    top2 = np.sort(logits, axis=0)[-2:]
    tie = spread_to((top2[1] - top2[0]) <= 2 * TOLERANCES["fp32"].max_abs_rel * float(logits.max() - logits.min()),
                    written.shape)
    np.testing.assert_array_equal(written[~tie], expected[~tie])
    assert (written != expected).mean() <= 1 - TOLERANCES["fp32"].label_agreement


def test_label_pngs_are_palette_pngs_of_the_specs_colours(engines, data_root, tmp_path):
    """Edge labels are written as the service writes them: 'P' mode, values the class indices, palette the
    spec's colours; a frame of another size than the spec's comes back at its own size."""
    folder, twin, _, _ = engines
    frames = tmp_path / "frames"
    frames.mkdir()
    source = sorted((data_root / "camvid" / "val").glob("*.png"))[0]
    Image.open(source).convert("RGB").resize((200, 150), Image.Resampling.BILINEAR).save(frames / "small.png")
    summary = run_engine(OnnxRuntimeEngine(folder / "unet.onnx"), str(frames), tmp_path / "out", outputs=("labels",),
                         progress=False)
    assert summary["frames"] == 1 and summary["segmented_at"] == [96, 128]
    written = Image.open(tmp_path / "out" / "labels" / "small.png")
    assert written.mode == "P" and written.size == (200, 150)
    palette = np.array(written.getpalette()[: 3 * twin.spec.num_classes]).reshape(-1, 3)
    np.testing.assert_array_equal(palette, twin.spec.palette())
    indices = np.asarray(written)
    assert indices.max() < twin.spec.num_classes and len(np.unique(indices)) > 1
    assert_twin_labels(indices, twin_logits_at_spec_size(twin, frames / "small.png"))


def test_archive_bundle_verifies_and_lists_its_engines(engines, tmp_path):
    folder, twin, private, public = engines
    archive = create_bundle(tmp_path / "unet.tar.gz", [folder / "unet.onnx"], private, name="unet-camvid")
    with verify_bundle(archive, public) as verified:
        assert verified.manifest.name == "unet-camvid" and verified.manifest.spec == twin.spec
        [entry] = verified.manifest.engines()
        assert entry.precision == "fp32" and entry.parity["label_agreement"] >= 0.9999
        extracted = verified.root
        assert (extracted / "unet.onnx").is_file()
    assert not extracted.exists()  # the temporary extraction is cleaned up


def test_changed_byte_in_an_engine_is_refused(engines, bundle):
    data = bytearray((bundle / "unet.fp16.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle / "unet.fp16.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleDigestError, match="unet.fp16.onnx"):
        verify_bundle(bundle, engines[3])


def test_changed_byte_in_the_manifest_is_refused(engines, bundle):
    text = (bundle / "manifest.json").read_text()
    (bundle / "manifest.json").write_text(text.replace('"label_agreement": 1.0', '"label_agreement": 1.00', 1)
                                          if '"label_agreement": 1.0' in text else text.replace("fp16", "fp17", 1))
    with pytest.raises(BundleSignatureError, match="signature does not verify"):
        verify_bundle(bundle, engines[3])


def test_missing_file_is_refused(engines, bundle):
    (bundle / "unet.onnx").unlink()
    with pytest.raises(BundleMissingFileError, match="unet.onnx"):
        verify_bundle(bundle, engines[3])
    (bundle / "manifest.sig").unlink()
    with pytest.raises(BundleMissingFileError, match="manifest.sig"):
        verify_bundle(bundle, engines[3])


def test_wrong_key_is_refused(engines, bundle, tmp_path):
    _, other_public = generate_keypair(tmp_path / "other")
    with pytest.raises(BundleKeyError, match="signed by key p256:"):
        verify_bundle(bundle, other_public)
    with pytest.raises(KeyFileError, match="not found"):
        verify_bundle(bundle, tmp_path / "nowhere.pub")


def test_a_file_the_manifest_does_not_list_is_refused(engines, bundle):
    (bundle / "extra.onnx").write_bytes(b"not listed")
    with pytest.raises(BundleUnexpectedFileError, match="extra.onnx"):
        verify_bundle(bundle, engines[3])


def _plan_for(target: PlanTarget, folder, twin) -> object:
    """A plan file with its sidecar and parity report, as `patchwatch export tensorrt` leaves them on the GPU
    machine that built it. The bytes are opaque to verification, which reads the recorded target."""
    plan = folder / f"unet.sm{target.compute_capability.replace('.', '')}.plan"
    plan.write_bytes(b"serialised TensorRT engine for " + target.model_dump_json().encode())
    info = PlanInfo(target=target, precision="fp16", profile={"min": (1, 3, 96, 128), "opt": (1, 3, 96, 128),
                    "max": (8, 3, 96, 128)}, workspace_bytes=1 << 30, onnx_digest="sha256:0", spec=twin.spec,
                    built_at=0.0)
    sidecar_path(plan).write_text(info.model_dump_json())
    shutil.copyfile(report_paths(folder / "unet.fp16.onnx")[0], report_paths(plan)[0])
    return plan


def test_plan_built_for_another_tensorrt_or_gpu_is_refused(engines, tmp_path):
    folder, twin, private, public = engines
    plan = _plan_for(ORIN, folder, twin)
    bundle = create_bundle(tmp_path / "b", [folder / "unet.onnx", plan], private)
    assert (bundle / f"{plan.name}.json").is_file()  # the target sidecar travels, signed
    with verify_bundle(bundle, public, target=ORIN) as ok:  # the vehicle it was built for
        assert ok.unchecked_plans == []
    newer = PlanTarget(tensorrt_version="11.4.0", compute_capability="8.7")
    with pytest.raises(BundleTargetError, match="TensorRT 10.3.0, this machine has TensorRT 11.4.0"):
        verify_bundle(bundle, public, target=newer)
    other_gpu = PlanTarget(tensorrt_version="10.3.0.26", compute_capability="8.9", device_name="L4")
    with pytest.raises(BundleTargetError, match="compute capability 8.7 \\(Orin\\).*8.9 \\(L4\\)"):
        verify_bundle(bundle, public, target=other_gpu)
    # With no TensorRT here, the plan cannot be checked: it is listed, and only ONNX runs.
    with verify_bundle(bundle, public, target=None) as here:
        assert here.unchecked_plans == [plan.name]
        assert isinstance(select_engine(here), OnnxRuntimeEngine)
        with pytest.raises(BundleTargetError, match="TensorRT"):
            select_engine(here, runtime="tensorrt")


def test_only_gated_engines_can_be_bundled(engines, tmp_path):
    folder, _, private, _ = engines
    shutil.copyfile(folder / "unet.onnx", tmp_path / "ungated.onnx")
    with pytest.raises(FileNotFoundError, match="parity report"):
        create_bundle(tmp_path / "b", [tmp_path / "ungated.onnx"], private)


def test_cli_verify_and_run_report_refusals_and_results(engines, bundle, data_root, tmp_path):
    public = engines[3]
    cli = [sys.executable, "-m", "patchwatch.cli", "edge"]
    ok = subprocess.run(cli + ["verify", str(bundle), "--key", str(public)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["verified"] is True
    (bundle / "unet.onnx").write_bytes(b"tampered")
    refused = subprocess.run(cli + ["verify", str(bundle), "--key", str(public)], capture_output=True, text=True)
    assert refused.returncode == 1 and "REFUSED (BundleSizeError)" in refused.stderr  # size, before hashing
    ran = subprocess.run(cli + ["run", str(bundle), "--key", str(public), "--source", str(data_root / "camvid" / "val"),
                                "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert ran.returncode == 1 and "REFUSED" in ran.stderr and not (tmp_path / "o" / "labels").exists()


def test_runner_logs_a_corrupt_frame_and_goes_on(engines, data_root, tmp_path):
    folder = engines[0]
    frames = tmp_path / "frames"
    frames.mkdir()
    for path in sorted((data_root / "camvid" / "val").glob("*.png"))[:3]:
        shutil.copyfile(path, frames / path.name)
    good = sorted(frames.iterdir())[1]
    (frames / "b_truncated.png").write_bytes(good.read_bytes()[:200])
    summary = run_engine(OnnxRuntimeEngine(folder / "unet.onnx"), str(frames), tmp_path / "out", outputs=("labels",),
                         progress=False)
    assert summary["frames"] == 3
    [error] = summary["errors"]
    assert error["name"] == "b_truncated.png" and "cannot decode" in error["error"]


def test_runner_limit_counts_frames_read_and_a_file_that_will_not_open_is_an_error(engines, data_root, tmp_path):
    engine = OnnxRuntimeEngine(engines[0] / "unet.onnx")
    summary = run_engine(engine, str(data_root / "camvid" / "val"), tmp_path / "out", outputs=("labels",), limit=2,
                         progress=False)
    first = [p.stem for p in sorted((data_root / "camvid" / "val").glob("*.png"))[:2]]
    assert summary["frames"] == 2 and summary["dropped"] == 0 and summary["source_events"] == []
    assert sorted(p.stem for p in (tmp_path / "out" / "labels").glob("*.png")) == first
    with pytest.raises(OSError, match="cannot open video"):  # one attempt: a file does not open later
        run_engine(engine, str(tmp_path / "missing.mp4"), tmp_path / "missing", progress=False)


def test_runner_reads_a_video_and_writes_an_overlay_video(engines, data_root, tmp_path):
    folder = engines[0]
    video = tmp_path / "drive.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (128, 96))
    for path in sorted((data_root / "camvid" / "val").glob("*.png"))[:5]:
        writer.write(cv2.resize(cv2.imread(str(path)), (128, 96), interpolation=cv2.INTER_AREA))
    writer.release()
    summary = run_engine(OnnxRuntimeEngine(folder / "unet.fp16.onnx"), str(video), tmp_path / "out", progress=False)
    assert summary["frames"] == 5 and summary["source"] == f"video {video}"
    assert abs(sum(summary["class_share"].values()) - 1.0) < 1e-3
    capture = cv2.VideoCapture(str(tmp_path / "out" / "overlay.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 5
    capture.release()
    assert len(list((tmp_path / "out" / "labels").glob("drive_*.png"))) == 5


def test_bundle_refuses_mixed_models(engines, camvid_unet, tmp_path, data_root):
    from conftest import fit_camvid_twin

    folder, _, private, _ = engines
    other = tmp_path / "other.pt"
    fit_camvid_twin(other, data_root, steps=2, seed=1)
    export_onnx_gated(other, tmp_path / "other.onnx", settings=ParitySettings(count=2), progress=False)
    with pytest.raises(BundleError, match="one model per bundle"):
        create_bundle(tmp_path / "b", [folder / "unet.onnx", tmp_path / "other.onnx"], private)
