"""Issue 16, "bring your own model": networks from other libraries, exported with their own code, become twins
that a campaign attacks; bad input is refused by name, and a refused import writes nothing.

(a) torchvision's DeepLabV3-ResNet50 (random weights, never downloaded) exported by `torch.onnx.export` and
    imported by `output.name`; the same network as a state dict through `--factory`, its dict output picked by
    name; segmentation-models-pytorch's U-Net (random weights) exported to ONNX. Each twin computes what the
    library's own module computes, and a one-trial campaign (shapes, 64x64, one 16 px patch, a few steps) runs
    on the ONNX twins in-process (`audit.trial.execute_trial`, as a Ray worker runs it) and is stored.
(b) Files that are not models, graphs without an image input, specs that disagree with the network (class count,
    layout, fixed size, output name, unknown fields), and a network the gate catches: each refused with the file
    and the field named, and nothing left in the output folder.
(c) The CLI once each way.
(d) What writing these found, fixed and kept as tests: torch's default ONNX export (opset 20) and the TorchScript
    exporter's shared initializers import; a normalisation that overflows the logits or the input is refused by
    name; a [0, 255] network sees the same picture as uint8 frames and as [0, 1] images.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner
from torch import nn

from export.engine import EngineInputError
from export.imports import import_twin_gated
from segmenters.data.shapes import SHAPE_CLASSES
from segmenters.importing.sources import ModelImportError
from segmenters.importing.spec import ImportSpecError

SIZE = 64
#: the imported networks predict the shapes classes, so a shapes campaign has its objects and targets
CLASSES = [{"name": c.name, "color": list(c.color)} for c in SHAPE_CLASSES]
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
GATE = {"images": "shapes", "count": 2, "progress": False}
DYNAMIC = ({0: "n", 2: "h", 3: "w"},)  # torch.onnx.export(dynamic_shapes=...) for the one image input


def write_spec(folder, name="spec.yaml", *, classes=CLASSES, output=None, extra=None, **inputs):
    data = {"name": "byom", "classes": classes, "input": {"size": [SIZE, SIZE], **inputs}, **(extra or {})}
    if output is not None:
        data["output"] = output
    path = folder / name
    path.write_text(yaml.safe_dump(data))
    return path


def export_onnx(model: nn.Module, path, output_names, **options):
    """The user's own export: torch's exporter at the opset the project converts (18), batch/height/width free."""
    torch.onnx.export(model, (torch.rand(1, 3, SIZE, SIZE),), str(path), input_names=["image"],
                      output_names=output_names, dynamic_shapes=DYNAMIC, opset_version=18, external_data=False,
                      **options)
    return path


def normalised(twin, images):
    return twin.spec.normalization.normalize(images)


def assert_close_to(got: torch.Tensor, want: torch.Tensor):
    scale = float(want.max() - want.min())
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= 1e-4 * scale, float((got - want).abs().max()) / scale


def assert_passed(result, out, fmt):
    assert result.report.passed and result.report.images == 2 and result.source.format == fmt
    assert result.checkpoint == out and out.is_file()
    assert json.loads(out.with_name(out.name + ".parity.json").read_text())["failures"] == []
    assert out.with_name(out.name + ".parity.png").stat().st_size > 0
    assert result.twin.spec.arch == "imported/byom" and result.twin.spec.class_names == [c["name"] for c in CLASSES]


# ------------------------------------------------------------------------------------------------ short campaign
def short_campaign(twin_path, folder, steps=4):
    """One trial of a shapes campaign on the imported twin, run in-process and stored; its record is checked
    against the twin itself (the patch pasted back by hand)."""
    from audit.campaign import expand, load_campaign
    from audit.patches import EOTConfig, paste
    from audit.store import TrialStore
    from audit.trial import execute_trial
    from segmenters.data import build_dataset
    from segmenters.twin import load_twin

    path = folder / "campaign.yaml"
    path.write_text(yaml.safe_dump({
        "name": "imported", "models": [str(twin_path)],
        "images": {"dataset": "shapes", "split": "val", "count": 1, "size": [SIZE, SIZE]},
        "targets": [{"kind": "switch"}], "patch_sizes": [16], "seeds": [0],
        # no EOT while optimising, plain CE over the target: the loss of a working attack descends
        "attack": {"steps": steps, "step_size": 4 / 255, "eot_samples": 1, "skip_flipped": False,
                   "eot": EOTConfig.none().model_dump(mode="json")},
        "eot_eval_draws": 2, "eot_eval_batch": 2, "device": "cpu"}))
    config = load_campaign(path)
    (trial,) = expand(config)
    result = execute_trial(config.model_dump_json(), trial, torch.device("cpu"))
    metrics, artefacts = result["metrics"], result["artefacts"]

    for key in ("success", "success_with_patch", "intended_flipped", "changed", "patch_area", "area_of_effect",
                "flip_distance_mean", "eot_success_mean", "eot_success_min", "target_pixels", "final_loss"):
        assert key in metrics, key
    assert metrics["steps"] == steps and metrics["patch_area"] == 256 and metrics["eot_draws"] == 2
    assert 0 <= metrics["success"] <= 1 and metrics["device"] == "cpu"
    assert metrics["area_of_effect"] == pytest.approx(metrics["changed"] / 256)
    losses = artefacts["losses.npy"]
    assert len(losses) == steps and np.isfinite(losses).all()
    assert losses[-1] < losses[0], losses  # gradients reach the pixels through the imported network
    assert metrics["final_loss"] == pytest.approx(float(losses[-1]))

    # the record says what the twin does with the patch: pasted again by hand, the same pixels change
    twin = load_twin(twin_path)
    image, _ = build_dataset("shapes", "val", size=(SIZE, SIZE))[trial.image_index]
    patch = torch.from_numpy(artefacts["patch.npy"])
    assert patch.shape == (3, 16, 16) and 0 <= float(patch.min()) and float(patch.max()) <= 1
    patched, covered = paste(image[None], patch, metrics["top"], metrics["left"])
    with torch.no_grad():
        clean, attacked = twin.labels(image[None])[0], twin.labels(patched)[0]
    changed = int(((clean != attacked) & ~covered).sum())
    assert changed == metrics["changed"] > 0  # the patch moved the imported twin's labels outside itself

    with TrialStore(folder / "run") as store:
        store.save_campaign(path.read_text(), config.model_dump_json())
        assert store.record(trial.as_dict(), metrics, artefacts, result["replay"], result["worker"], result["seconds"])
        (row,) = store.rows()
    assert row["metrics"]["changed"] == metrics["changed"] and (store.artefact_dir(trial.id) / "patch.npy").exists()
    return metrics


# ------------------------------------------------------------------------------------------------ (a) torchvision
@pytest.fixture(scope="module")
def deeplab():
    """torchvision's DeepLabV3-ResNet50 with its auxiliary FCN head, random weights (nothing downloaded)."""
    from torchvision.models.segmentation import deeplabv3_resnet50

    kwargs = {"weights": None, "weights_backbone": None, "num_classes": len(CLASSES), "aux_loss": True}
    torch.manual_seed(0)
    return deeplabv3_resnet50(**kwargs).eval(), kwargs


@pytest.mark.slow
def test_torchvision_deeplabv3_from_onnx_picks_its_output_by_name_and_is_attacked(deeplab, tmp_path):
    model, _ = deeplab
    # torchvision returns {"out": ..., "aux": ...}; torch's exporter writes both, named as the dict's keys
    path = export_onnx(model, tmp_path / "deeplabv3.onnx", ["out", "aux"])
    spec = write_spec(tmp_path, output={"name": "out"}, **IMAGENET)
    out = tmp_path / "twins" / "deeplabv3.pt"
    result = import_twin_gated(path, spec, out, **GATE)
    assert_passed(result, out, "onnx")

    images = torch.rand((2, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(normalised(result.twin, images))
        got = result.twin.logits(images)
    assert_close_to(got, want["out"])
    assert float((got - want["aux"]).abs().max()) > 1e-2  # it is the main head, not the auxiliary one

    metrics = short_campaign(out, tmp_path)
    assert metrics["description"].startswith("class ")


@pytest.mark.slow
def test_torchvision_state_dict_through_a_factory_picks_the_dict_output_by_name(deeplab, tmp_path):
    model, kwargs = deeplab
    weights = tmp_path / "deeplabv3_state.pth"
    torch.save(model.state_dict(), weights)
    spec = write_spec(tmp_path, output={"name": "aux"}, **IMAGENET)
    out = tmp_path / "deeplabv3_aux.pt"
    result = import_twin_gated(weights, spec, out, factory="torchvision.models.segmentation:deeplabv3_resnet50",
                               factory_kwargs=kwargs, **GATE)
    assert_passed(result, out, "python")
    assert result.source.factory == "torchvision.models.segmentation:deeplabv3_resnet50"

    images = torch.rand((1, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(normalised(result.twin, images))
        got = result.twin.logits(images)  # the twin as read back from `out`, rebuilt by the factory
    assert_close_to(got, want["aux"])
    assert float((got - want["out"]).abs().max()) > 1e-2


# ------------------------------------------------------------------------------------------------ (a) smp
@pytest.mark.slow
def test_segmentation_models_pytorch_unet_from_onnx_is_attacked(tmp_path):
    smp = pytest.importorskip("segmentation_models_pytorch",
                              reason="the smp import test needs segmentation-models-pytorch (test extra)")
    torch.manual_seed(0)
    model = smp.Unet(encoder_name="resnet18", encoder_weights=None, classes=len(CLASSES)).eval()
    path = export_onnx(model, tmp_path / "unet.onnx", ["logits"])
    spec = write_spec(tmp_path, **IMAGENET)
    out = tmp_path / "unet.pt"
    result = import_twin_gated(path, spec, out, **GATE)
    assert_passed(result, out, "onnx")

    images = torch.rand((2, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close_to(result.twin.logits(images), model(normalised(result.twin, images)))
    short_campaign(out, tmp_path)


# ------------------------------------------------------------------------------------------------ (b) bad input
def conv_graph(path, classes=len(CLASSES), shape=("n", 3, "h", "w")):
    """A one-Conv ONNX graph (random weights): logits for `classes` classes at the input's size."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.normal(size=(classes, 3, 3, 3)).astype(np.float32), "w"),
               numpy_helper.from_array(rng.normal(size=(classes,)).astype(np.float32), "b")]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w", "b"], ["logits"], pads=[1, 1, 1, 1])], "conv",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [shape[0], classes, shape[2], shape[3]])],
        weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def flat_graph(path):
    """An ONNX graph whose one input is (N, 10): no image anywhere."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["features", "w"], ["scores"])], "flat",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["n", 10])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(np.ones((10, 4), np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


class Noisy(nn.Module):
    """Not a function of its input: fresh noise on every call, as a network left in training mode can be."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, len(CLASSES), 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y + 10 * torch.randn_like(y)


def case_random_bytes(tmp_path):
    (tmp_path / "model.onnx").write_bytes(os.urandom(4096))
    return tmp_path / "model.onnx", write_spec(tmp_path), {}


def case_text_as_pt2(tmp_path):
    (tmp_path / "model.pt2").write_text("a torch.export program, honestly\n")
    return tmp_path / "model.pt2", write_spec(tmp_path), {}


def case_state_dict_as_torchscript(tmp_path):
    torch.save(nn.Conv2d(3, len(CLASSES), 1).state_dict(), tmp_path / "model.pt")
    return tmp_path / "model.pt", write_spec(tmp_path), {}


def case_no_image_input(tmp_path):
    return flat_graph(tmp_path / "model.onnx"), write_spec(tmp_path), {}


def case_class_count(tmp_path):
    return conv_graph(tmp_path / "model.onnx"), write_spec(tmp_path, classes=CLASSES[:3]), {}


def case_unknown_input_field(tmp_path):
    return conv_graph(tmp_path / "model.onnx"), write_spec(tmp_path, colour="rgb"), {}


def case_unknown_top_field(tmp_path):
    return conv_graph(tmp_path / "model.onnx"), write_spec(tmp_path, extra={"labels": 4}), {}


def case_layout_dynamic(tmp_path):  # the channels-first graph with free height/width, described as NHWC
    return conv_graph(tmp_path / "model.onnx"), write_spec(tmp_path, layout="nhwc"), {}


def case_layout_fixed(tmp_path):  # a (1, 3, 64, 64) graph described as NHWC: 64 "channels"
    return (conv_graph(tmp_path / "model.onnx", shape=(1, 3, SIZE, SIZE)),
            write_spec(tmp_path, layout="nhwc", fixed_size=True), {})


def case_fixed_size_unsaid(tmp_path):
    return conv_graph(tmp_path / "model.onnx", shape=(1, 3, SIZE, SIZE)), write_spec(tmp_path), {}


def case_output_name(tmp_path):
    return conv_graph(tmp_path / "model.onnx"), write_spec(tmp_path, output={"name": "out"}), {}


def case_gate_fails(tmp_path):
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(Noisy().eval()), str(tmp_path / "noisy.pt"))
    return tmp_path / "noisy.pt", write_spec(tmp_path), {}


def case_factory_mismatch(tmp_path):  # a state dict that is not the factory's network
    torch.save(nn.Conv2d(3, 8, 1).state_dict(), tmp_path / "weights.pth")
    return tmp_path / "weights.pth", write_spec(tmp_path), {
        "factory": "torch.nn:Conv2d", "factory_kwargs": {"in_channels": 3, "out_channels": 4, "kernel_size": 1}}


# (case, error, what the message must name: "model"/"spec" for the files, then fields and phrases)
BAD = [
    (case_random_bytes, ModelImportError, ["model", "not a readable ONNX model"]),
    (case_text_as_pt2, ModelImportError, ["model", "not a torch.export file"]),
    (case_state_dict_as_torchscript, ModelImportError, ["model", "not a torchscript file", "--factory"]),
    (case_no_image_input, ModelImportError, ["model", "'features'", "not an image batch"]),
    (case_class_count, ModelImportError, ["model", "spec", "4 channels", "3 classes", "classes"]),
    (case_unknown_input_field, ImportSpecError, ["spec", "input.colour", "Extra inputs are not permitted"]),
    (case_unknown_top_field, ImportSpecError, ["spec", "labels", "Extra inputs are not permitted"]),
    (case_layout_dynamic, ModelImportError, ["model", "spec", "input.layout"]),
    (case_layout_fixed, ModelImportError, ["model", "input.layout", "64 channels"]),
    (case_fixed_size_unsaid, ModelImportError, ["model", "input.fixed_size: true"]),
    (case_output_name, ModelImportError, ["model", "output.name 'out'", "['logits']"]),
    (case_gate_fails, ModelImportError, ["model", "spec", "import refused, nothing written", "label agreement"]),
    (case_factory_mismatch, ModelImportError, ["model", "does not fit torch.nn:Conv2d"]),
]


@pytest.mark.parametrize("case, error, named", BAD, ids=[c.__name__.removeprefix("case_") for c, _, _ in BAD])
def test_bad_input_is_refused_by_name_and_writes_nothing(tmp_path, case, error, named):
    model, spec, options = case(tmp_path)
    folder = tmp_path / "out"
    folder.mkdir()  # an existing folder: the import stages its scratch files in it, and must leave none
    out = folder / "twin.pt"
    with pytest.raises(error) as info:
        import_twin_gated(model, spec, out, **GATE, **options)
    message = str(info.value)
    for part in named:
        assert {"model": str(model), "spec": str(spec)}.get(part, part) in message, (part, message)
    assert not out.exists() and not (folder / "twin.pt.parity.json").exists()
    assert not (folder / "twin.pt.parity.png").exists()
    assert list(folder.iterdir()) == []


def test_fixed_size_graph_with_its_flag_and_the_right_layout_imports(tmp_path):
    """The graph two refusals above turned away, described as it is: imported, one image at a time."""
    model = conv_graph(tmp_path / "model.onnx", shape=(1, 3, SIZE, SIZE))
    result = import_twin_gated(model, write_spec(tmp_path, fixed_size=True), tmp_path / "twin.pt", **GATE)
    assert result.report.passed and result.source.batch_of_one
    images = torch.rand((3, 3, 96, 80))  # another size and a batch: resized to 64x64, split, and brought back
    assert result.twin.logits(images).shape == (3, len(CLASSES), 96, 80)


# ------------------------------------------------------------------------------------------------ (c) the CLI
def test_cli_refuses_with_the_field_named_and_imports_a_state_dict(tmp_path):
    from patchwatch.cli import main
    from segmenters.twin import load_twin

    runner = CliRunner()
    model, spec, _ = case_class_count(tmp_path)
    out = tmp_path / "out" / "twin.pt"
    refused = runner.invoke(main, ["import", str(model), "--spec", str(spec), "--out", str(out), "--images",
                                   "shapes", "--count", "2", "--quiet"])
    assert refused.exit_code == 1 and "classes" in refused.output and str(spec) in refused.output, refused.output
    assert refused.exception is None or isinstance(refused.exception, SystemExit)  # a message, not a traceback
    assert not out.parent.exists()

    torch.manual_seed(0)
    conv = nn.Conv2d(3, len(CLASSES), 3, padding=1).eval()
    torch.save(conv.state_dict(), tmp_path / "conv.pth")
    kwargs = {"in_channels": 3, "out_channels": len(CLASSES), "kernel_size": 3, "padding": 1}
    good = runner.invoke(main, ["import", str(tmp_path / "conv.pth"), "--spec", str(write_spec(tmp_path, **IMAGENET)),
                                "--out", str(out), "--images", "shapes", "--count", "2", "--factory", "torch.nn:Conv2d",
                                "--factory-kwargs", json.dumps(kwargs), "--quiet"])
    assert good.exit_code == 0, good.output
    summary = json.loads(good.stdout)
    assert summary["twin"] == str(out) and summary["format"] == "python" and summary["arch"] == "imported/byom"
    assert summary["classes"] == [c["name"] for c in CLASSES] and "parity PASS" in good.stderr
    assert out.is_file() and (out.parent / "twin.pt.parity.json").is_file()
    twin = load_twin(out)
    images = torch.rand((1, 3, SIZE, SIZE))
    with torch.no_grad():
        assert_close_to(twin.logits(images), conv(normalised(twin, images)))


# ------------------------------------------------------------------------------------------------ (d) known gaps
class Small(nn.Module):
    """Conv-BN-ReLU twice (bias-free convolutions, as in ResNets), then logits resized to the input."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU(), nn.Conv2d(8, len(CLASSES), 1))

    def forward(self, x):
        return F.interpolate(self.body(x), size=x.shape[-2:], mode="bilinear", align_corners=False)


def test_torch_default_onnx_export_imports(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "small.onnx"
    torch.onnx.export(Small().eval(), (torch.rand(1, 3, SIZE, SIZE),), str(path), input_names=["image"],
                      output_names=["logits"], dynamic_shapes=DYNAMIC, opset_version=20)  # torch 2.14's default
    assert import_twin_gated(path, write_spec(tmp_path), tmp_path / "twin.pt", **GATE).report.passed


def test_legacy_exporter_with_shared_initializers_imports(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "small.onnx"
    torch.onnx.export(Small().eval(), (torch.rand(1, 3, SIZE, SIZE),), str(path), input_names=["image"],
                      output_names=["logits"], dynamo=False, opset_version=18,
                      dynamic_axes={"image": {0: "n", 2: "h", 3: "w"}})
    assert import_twin_gated(path, write_spec(tmp_path), tmp_path / "twin.pt", **GATE).report.passed


def _refused_for_its_normalisation(tmp_path, **inputs):
    model = conv_graph(tmp_path / "model.onnx")
    spec = write_spec(tmp_path, **inputs)
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(ModelImportError) as info:
        import_twin_gated(model, spec, folder / "twin.pt", **GATE)
    assert "input.std" in str(info.value) and str(spec) in str(info.value)
    assert list(folder.iterdir()) == []


def test_a_normalisation_that_overflows_the_logits_is_refused(tmp_path):
    _refused_for_its_normalisation(tmp_path, std=[1e-38, 1e-38, 1e-38])


def test_a_normalisation_that_overflows_the_input_is_refused(tmp_path):
    _refused_for_its_normalisation(tmp_path, mean=[1e30, 1e30, 1e30], std=[1e-10, 1e-10, 1e-10])


def test_a_0_255_network_sees_the_same_picture_as_frames_and_as_float_images(tmp_path):
    from export.engine import TorchEngine

    spec = write_spec(tmp_path, value_range=[0, 255], mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375])
    twin = import_twin_gated(conv_graph(tmp_path / "model.onnx"), spec, tmp_path / "twin.pt", **GATE).twin
    frames = np.random.default_rng(0).integers(0, 256, (1, SIZE, SIZE, 3), dtype=np.uint8)
    served = TorchEngine(twin, device="cpu").segment(frames)[0]
    with torch.no_grad():
        attacked = twin.labels(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255)[0].numpy()
    assert (served == attacked).mean() > 0.99
