"""Importing networks trained elsewhere (issue 16): the zoo's own exports round-trip through the importer and keep
their attack results, every file format and input convention lands on the same twin, an imported twin exports
through the gate again, VGatt names what a converted graph makes approximate, and MediaPipe's real selfie
segmenter comes in through tflite2onnx -> onnx2torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from audit.attack import AttackConfig, class_switch_target, patch_attack
from audit.patches import EOTConfig
from audit.vgatt import VGatt
from export.imports import import_twin_gated
from export.onnx_export import export_onnx
from export.parity import parity_images
from segmenters.importing.sources import ModelImportError
from segmenters.models import MODELS, build_model
from segmenters.spec import ClassInfo, ModelSpec
from segmenters.twin import Twin, load_twin

SIZE = (64, 64)
CLASSES = [ClassInfo(name=f"class{i}", color=(40 * i, 255 - 40 * i, 7 * i)) for i in range(3)]


def zoo_twin(arch: str, seed: int = 0) -> Twin:
    """A zoo model with batch norms given real statistics, so its labels vary over the image."""
    torch.manual_seed(seed)
    model = build_model(arch, len(CLASSES))
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(4, 3, *SIZE))
    spec = ModelSpec(arch=arch, classes=CLASSES, input_size=SIZE, dataset="shapes")
    return Twin(model.eval(), spec)


def write_spec(path: Path, spec: ModelSpec, **changes) -> Path:
    """The sidecar a user would write for a network that takes `spec`'s normalisation."""
    data = {"name": spec.arch.replace("/", "_"), "classes": [c.model_dump() for c in spec.classes],
            "input": {"size": list(spec.input_size), "mean": list(spec.normalization.mean),
                      "std": list(spec.normalization.std)},
            "parity_images": "shapes"}
    for key, value in changes.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(data))
    return path


def import_zoo(arch: str, folder: Path, count: int = 2):
    """A zoo twin exported by the project and imported back: (the zoo twin, the import's result)."""
    twin = zoo_twin(arch)
    export_onnx(twin, folder / f"{arch}.onnx", sample_size=SIZE)
    result = import_twin_gated(folder / f"{arch}.onnx", write_spec(folder / f"{arch}.yaml", twin.spec),
                               folder / f"{arch}.pt", count=count, progress=False)
    return twin, result


def small_attack(twin: Twin, image: np.ndarray):
    box = np.zeros(SIZE, bool)
    box[8:40, 8:56] = True
    config = AttackConfig(steps=4, step_size=4 / 255, eot=EOTConfig.none(), eot_samples=1, skip_flipped=False)
    return patch_attack(twin, image, class_switch_target(box, 2), 12, 26, 26, config, seed=3)


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_zoo_round_trip_keeps_the_gate_and_the_attack(arch, tmp_path):
    """Each zoo model exported by the project, imported back: fp32 gate against ONNX Runtime, same patch."""
    twin, result = import_zoo(arch, tmp_path, count=4)
    assert result.report.passed and result.report.max_abs_rel <= 1e-4 and result.report.label_agreement >= 0.9999
    assert Path(f"{result.checkpoint}.parity.json").is_file() and Path(f"{result.checkpoint}.parity.png").is_file()
    imported = load_twin(result.checkpoint)
    assert imported.spec.arch == f"imported/{arch}" and imported.spec.classes == twin.spec.classes
    assert imported.spec.training["format"] == "onnx"
    image = parity_images("shapes", 1, size=SIZE)[0][1]
    original, again = small_attack(twin, image), small_attack(imported, image)
    assert np.abs(original.patch - again.patch).max() <= 1e-5
    assert original.losses == pytest.approx(again.losses, rel=1e-4, abs=1e-6)


class ChannelsLastBgr(nn.Module):
    """A network as another team might ship it: NHWC BGR in, NHWC probabilities out."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, images):
        logits = self.inner(images.permute(0, 3, 1, 2).flip(1))
        return logits.softmax(1).permute(0, 2, 3, 1)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torch.export", "torchscript"])
def test_pytorch_files_with_another_convention_land_on_the_same_twin(fmt, tmp_path):
    twin = zoo_twin("unet")
    shipped = ChannelsLastBgr(twin.model).eval()
    example = torch.rand(1, *SIZE, 3)
    path = tmp_path / ("model.pt2" if fmt == "torch.export" else "model.ts")
    if fmt == "torch.export":
        torch.export.save(torch.export.export(shipped, (example,)), path)
    else:
        torch.jit.save(torch.jit.trace(shipped, example), path)
    mean, std = twin.spec.normalization.mean, twin.spec.normalization.std
    spec_path = write_spec(tmp_path / "spec.yaml", twin.spec,
                           input={"layout": "nhwc", "channel_order": "bgr", "mean": list(mean[::-1]),
                                  "std": list(std[::-1]), "fixed_size": fmt == "torch.export"},
                           output={"kind": "probabilities", "layout": "nhwc"})
    result = import_twin_gated(path, spec_path, tmp_path / "twin.pt", count=4, progress=False)
    assert result.report.passed and result.source.format == fmt
    imported = load_twin(tmp_path / "twin.pt")
    images = torch.from_numpy(np.stack([image for _, image in parity_images("shapes", 2, size=SIZE)]))
    with torch.no_grad():
        # the same labels as the zoo twin on RGB input: the adapter undid NHWC, BGR and the softmax
        assert torch.equal(imported.labels(images), twin.labels(images))
        expected = twin.logits(images).log_softmax(1)
        assert torch.allclose(imported.logits(images), expected, atol=1e-4)


@pytest.mark.slow
def test_an_imported_twin_exports_through_the_gate(tmp_path):
    from export.pipeline import ParitySettings, export_onnx_gated

    _, result = import_zoo("deeplabv3_resnet18", tmp_path)
    reports = export_onnx_gated(result.checkpoint, tmp_path / "engine.onnx", progress=False,
                                settings=ParitySettings(count=3))  # the images the import was gated on
    assert reports["fp32"].passed and reports["fp32"].source == "shapes" and (tmp_path / "engine.onnx").is_file()


@pytest.mark.slow
def test_vgatt_is_exact_on_a_converted_relu_graph_and_names_the_rest(tmp_path):
    for arch, exact in (("unet", True), ("lraspp_mobilenetv3", False)):
        imported = import_zoo(arch, tmp_path)[1].twin
        torch.manual_seed(0)
        result = VGatt(imported.model).attribute(torch.randn(3, *SIZE), target=1)
        assert result.exact == exact, result.non_affine_layers
        if exact:
            assert result.completeness_error <= 1e-6
        else:  # hardswish and the attention product of LR-ASPP, named by the converted graph's modules
            kinds = " ".join(result.non_affine_layers)
            assert "network." in kinds and "x*g(x) activation" in kinds and "product of two activations" in kinds


def test_a_failed_import_writes_nothing(tmp_path):
    twin = zoo_twin("unet")
    export_onnx(twin, tmp_path / "model.onnx", sample_size=SIZE)
    out = tmp_path / "out" / "twin.pt"
    spec_path = write_spec(tmp_path / "spec.yaml", twin.spec, classes=[c.model_dump() for c in CLASSES[:2]])
    with pytest.raises(ModelImportError, match="classes"):
        import_twin_gated(tmp_path / "model.onnx", spec_path, out, count=2, progress=False)
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_one_foreground_channel_becomes_two_classes_with_scores_that_move():
    """A sigmoid model's probability p becomes logits whose softmax is (1 - p, p), and both classes' scores
    depend on the input (so VGatt can explain either class)."""
    from segmenters.importing.adapter import ImportedNetwork
    from segmenters.importing.spec import ImportSpec

    spec = ImportSpec.model_validate({"name": "fg", "classes": [c.model_dump() for c in CLASSES[:2]],
                                      "input": {"size": [8, 8]}, "output": {"kind": "foreground_probability"}})
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv2d(3, 1, 3, padding=1), nn.Sigmoid())
    wrapped = ImportedNetwork(network, spec, 0).eval()
    images = torch.rand(2, 3, 8, 8, requires_grad=True)
    logits = wrapped(images)
    assert logits.shape == (2, 2, 8, 8)
    assert torch.allclose(logits.softmax(1)[:, 1:], network(images), atol=1e-5)
    (grad,) = torch.autograd.grad(logits[:, 0].sum(), images)
    assert grad.abs().sum() > 0


@pytest.mark.slow
def test_bounds_say_an_imported_architecture_is_not_known(tmp_path):
    from click.testing import CliRunner

    from audit.cli import audit

    checkpoint = import_zoo("unet", tmp_path)[1].checkpoint
    result = CliRunner().invoke(audit, ["bounds", "--arch", "unet", "--patch", "2", "--twin", str(checkpoint),
                                        "--lines", "1", "--samples", "64", "--device", "cpu", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "imported/unet is an imported network, not a zoo architecture" in result.output
    empirical = json.loads((tmp_path / "bounds.json").read_text())["empirical"]
    assert empirical[0]["patch"] == 2 and empirical[0]["regions"]
