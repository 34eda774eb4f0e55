"""VGatt (exact decomposition for piecewise-affine twins, measured error for the others), Grad-CAM through
captum, the pixel-removal test and attribution seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from audit.attribution import GradCam, OcclusionMap, VGattMap, pixel_removal, upsample
from audit.seeds import UNKNOWN, attribution_seeds, seed_quality
from audit.vgatt import VGatt, region_mask, relative_miss
from segmenters.models import build_model


def with_random_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Batch norms with random affine terms and running statistics calibrated on random images, so every layer
    has a real bias and the input still matters at depth (at initialisation BN is mean 0 / var 1 / weight 1 /
    bias 0: many zoo models would be bias-free, and deep ones would ignore their input)."""
    generator = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for module in norms:
        module.weight.data.copy_(0.5 + torch.rand(module.num_features, generator=generator))
        module.bias.data.copy_(0.2 * torch.randn(module.num_features, generator=generator))
        module.reset_running_stats()
        module.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, 64, 64, generator=generator))
    return model.eval()


#: a per-pixel offset on LR-ASPP's high-resolution classifier: the bias then carries nearly all of the score, as
#: on the trained CamVid twin (bias ~100 % of the score)
HEAD_BIAS = 50.0

# input and two inner layers per piecewise-affine architecture
EXACT = {
    "unet": ["encoders.1.2", "decoders.0.1"],
    "deeplabv3_resnet18": ["model.backbone.layer2.0.conv1", "model.backbone.layer4.1.bn2"],
    "ladder_densenet121": ["block3.1.denselayer2.relu1", "block4.1.denselayer4.conv2"],
}


@pytest.mark.parametrize("arch", sorted(EXACT))
def test_vgatt_is_exact_for_piecewise_affine_twins(arch):
    torch.manual_seed(0)
    model = with_random_statistics(build_model(arch, 5))
    image = torch.randn(1, 3, 64, 64)
    box = (8, 8, 40, 56)
    for layer in [None, *EXACT[arch]]:
        result = VGatt(model, layer).attribute(image, target=2, region=box)
        assert result.dtype == "float64" and result.exact and not result.non_affine_layers
        assert result.completeness_error <= 1e-6, (layer, result.completeness_error)
        assert abs(result.bias) > 1e-6 * abs(result.score)  # a real bias, computed two independent ways
        assert result.bias == pytest.approx(result.bias_frozen, rel=1e-9, abs=1e-9)
        assert result.contributions.sum() + result.bias == pytest.approx(result.score, rel=1e-12)


@pytest.mark.parametrize("arch", ["lraspp_mobilenetv3", "deeplabv3_mobilenetv3"])
def test_mobilenet_twins_are_reported_as_approximate(arch):
    torch.manual_seed(0)
    model = with_random_statistics(build_model(arch, 5))
    result = VGatt(model).attribute(torch.randn(3, 64, 64), target=1)
    kinds = " ".join(result.non_affine_layers)
    assert not result.exact and "x*g(x) activation" in kinds and "product of two activations" in kinds
    # hardswish and squeeze-excitation gates move with the input: the frozen-gate bias misses what they add
    assert result.completeness_error > 1e-6


def test_lraspp_is_exact_where_only_its_attention_branch_is_not():
    """At `classifier.cbr` LR-ASPP is piecewise affine: the attention branch (sigmoid) beside it reads the backbone,
    not cbr, and the product cbr * attention is linear in cbr; one stage up, the same branch depends on the layer."""
    torch.manual_seed(0)
    model = with_random_statistics(build_model("lraspp_mobilenetv3", 5))
    image, box = torch.randn(3, 64, 64), (8, 8, 40, 56)
    at_cbr = VGatt(model, "model.classifier.cbr").attribute(image, target=1, region=box)
    assert at_cbr.exact and not at_cbr.non_affine_layers
    assert at_cbr.completeness_error_vs_contributions <= 1e-12 and at_cbr.completeness_error <= 1e-12
    assert at_cbr.bias == pytest.approx(at_cbr.bias_frozen, rel=1e-9)
    at_input = VGatt(model).attribute(image, target=1, region=box)
    assert not at_input.exact and at_input.completeness_error_vs_contributions > 1e-6
    # the backbone's last stage feeds both cbr and the attention branch: its sigmoid and the product now count,
    # the hardswish gates upstream of the stage do not
    at_backbone = VGatt(model, "model.backbone.16").attribute(image, target=1, region=box)
    assert set(at_backbone.non_affine_layers) == {"model.classifier.scale.2 (sigmoid/tanh)",
                                                  "model.classifier (product of two activations)"}


def lraspp_with_dominant_bias(classes: int) -> nn.Module:
    torch.manual_seed(0)
    model = with_random_statistics(build_model("lraspp_mobilenetv3", classes))
    with torch.no_grad():
        model.model.classifier.high_classifier.bias += HEAD_BIAS
    return model


def test_completeness_is_reported_against_the_contributions_when_the_bias_dominates():
    model = lraspp_with_dominant_bias(5)
    result = VGatt(model).attribute(torch.randn(3, 64, 64), target=1, region=(8, 8, 40, 56))
    total = result.contributions.sum()
    assert abs(total) < abs(result.score)
    # one miss, two scales: against the contributions it is the larger figure, and the one that says how wrong
    # the map is
    assert result.completeness_error_vs_contributions >= result.completeness_error > 0
    assert result.completeness_error_vs_contributions * abs(total) == pytest.approx(
        result.completeness_error * abs(result.score), rel=1e-9)
    assert relative_miss(0.0, 0.0) == 0.0 and relative_miss(1e-3, 0.0) == float("inf")


def test_an_audit_stores_and_reports_both_completeness_figures():
    """What `audit vgatt` stores per trial, summarises and shows on the report page: the miss against the
    contributions (the headline) and against the score, worst over the maps, on the bias-dominated LR-ASPP."""
    from pathlib import Path

    from audit.patch_audit import _attributions, summarise_audits
    from audit.report import _attribution_section
    from segmenters.data import dataset_classes
    from segmenters.spec import ModelSpec
    from segmenters.twin import Twin

    spec = ModelSpec(arch="lraspp_mobilenetv3", classes=dataset_classes("camvid"), input_size=(64, 64),
                     dataset="camvid")
    model = lraspp_with_dominant_bias(spec.num_classes)
    generator = torch.Generator().manual_seed(1)
    pictures = {name: torch.rand(1, 3, 64, 64, generator=generator) for name in ("attacked", "clean")}
    region, inside = np.zeros((64, 64), bool), np.zeros((64, 64), bool)
    region[8:40, 8:56], inside[:8, :8] = True, True
    metrics = {"target_class": 1, "patch_area_share": float(inside.mean())}
    _attributions(VGatt(model), Twin(model, spec), pictures, 1, region, inside, metrics)
    worst = max(metrics[f"completeness_error_vs_contributions_{name}"] for name in pictures)
    summary = summarise_audits([{"id": "trial", "metrics": {"success": 1.0}}], {"trial": metrics})
    assert summary["completeness_error_vs_contributions_max"] == worst > 0
    assert summary["completeness_error_max"] == max(metrics[f"completeness_error_{name}"] for name in pictures) > 0
    assert summary["vgatt_maps"] == 2 and not summary["exact"]
    page = _attribution_section(summary, 1, Path("run"))
    assert f"<b>{worst:.1e}</b> of the contributions' sum (headline)" in page and "approximate" in page
    assert f"{summary['completeness_error_max']:.1e} of the score" in page


def test_vgatt_matches_a_network_worked_by_hand():
    """1x1 conv -> ReLU -> 1x1 conv: contributions and bias follow from the active units alone."""
    first, second = nn.Conv2d(3, 2, 1), nn.Conv2d(2, 2, 1)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 1.0]]).view(2, 3, 1, 1))
        first.bias.copy_(torch.tensor([0.5, -1.0]))
        second.weight.copy_(torch.tensor([[2.0, 3.0], [1.0, 1.0]]).view(2, 2, 1, 1))
        second.bias.copy_(torch.tensor([0.25, 0.0]))
    model = nn.Sequential(first, nn.ReLU(), second).eval()
    x = torch.tensor([[1.0, 2.0], [0.5, -1.0]])[None].expand(3, 2, 2).clone()
    x[1] = torch.tensor([[0.0, 1.0], [-1.0, 0.5]])
    result = VGatt(model).attribute(x, target=0)
    weights, biases = first.weight.detach().view(2, 3).double(), first.bias.detach().double()
    head = second.weight.detach().view(2, 2)[0].double()
    contributions, bias = np.zeros((3, 2, 2)), 0.0
    for i in range(2):
        for j in range(2):
            pre = weights @ x[:, i, j].double() + biases
            active = (pre > 0).double()
            w = (head * active) @ weights  # d score / d x at (i, j)
            contributions[:, i, j] = (w * x[:, i, j].double()).numpy()
            bias += float((head * active) @ biases) + 0.25
    np.testing.assert_allclose(result.contributions, contributions, rtol=1e-12, atol=1e-12)
    assert result.bias == pytest.approx(bias, rel=1e-12) and result.bias_frozen == pytest.approx(bias, rel=1e-12)
    assert result.bias_ratio == pytest.approx(bias / result.score)


def test_train_mode_batch_norm_is_named_and_breaks_exactness():
    torch.manual_seed(0)
    model = with_random_statistics(build_model("unet", 3)).train()
    result = VGatt(model).attribute(torch.randn(1, 3, 32, 32), target=0)
    assert any("batch norm in train mode" in name for name in result.non_affine_layers)
    assert result.completeness_error > 1e-6
    # at an inner layer only the norms that run on its data count, not the encoder's before it
    named = VGatt(model, "decoders.0.1").attribute(torch.randn(1, 3, 32, 32), target=0).non_affine_layers
    assert "decoders.1.1 (batch norm in train mode)" in named and not any(n.startswith("encoders") for n in named)


def test_clear_errors():
    model = build_model("unet", 3).eval()
    with pytest.raises(ValueError, match="no layer 'nope'"):
        VGatt(model, "nope")
    vgatt = VGatt(model)
    image = torch.rand(3, 32, 32)
    with pytest.raises(ValueError, match="target class 7 is outside"):
        vgatt.attribute(image, target=7)
    with pytest.raises(ValueError, match="region is empty"):
        vgatt.attribute(image, target=0, region=np.zeros((32, 32), bool))
    with pytest.raises(ValueError, match="region mask is"):
        vgatt.attribute(image, target=0, region=np.ones((16, 16), bool))
    with pytest.raises(ValueError, match="does not lie inside"):
        vgatt.attribute(image, target=0, region=(0, 0, 40, 10))
    with pytest.raises(ValueError, match="one image at a time"):
        vgatt.attribute(torch.rand(2, 3, 32, 32), target=0)
    assert region_mask(None, (4, 5)).all()


def test_grad_cam_is_the_averaged_gradient_map():
    torch.manual_seed(0)
    model = with_random_statistics(build_model("unet", 4))
    image = torch.randn(1, 3, 32, 32)
    layer = dict(model.named_modules())["encoders.1.2"]
    captured = {}
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.update(a=out))
    score = model(image)[0, 1, 4:20, 4:28].sum()
    (grad,) = torch.autograd.grad(score, captured["a"])
    handle.remove()
    expected = (grad.mean(dim=(2, 3), keepdim=True) * captured["a"]).sum(1)[0].detach().numpy()
    cam = GradCam(model, "encoders.1.2").attribute(image, target=1, region=(4, 4, 20, 28))
    np.testing.assert_allclose(cam, expected, rtol=1e-4, atol=1e-5)
    assert upsample(cam, (32, 32)).shape == (32, 32)


@pytest.mark.data
def test_pixel_removal_vgatt_against_grad_cam(camvid_unet, data_root):
    """Appendix A.2 on a trained twin: blacking out VGatt's most relevant pixels moves the score and the labels
    more than blacking out Grad-CAM's (the thesis's finding, and what makes VGatt worth its cost)."""
    from segmenters.data import build_dataset

    _, twin = camvid_unet
    image, _ = build_dataset("camvid", "val", root=data_root / "camvid", size=(96, 128))[0]
    inputs = twin.spec.normalization.normalize(image[None])
    labels = twin.labels(image[None])[0]
    # An object-like segment, as in the thesis: the largest class under half the image (removing 8 % of the
    # pixels cannot say much about a class that covers most of the image, whichever map picks them).
    counts = torch.bincount(labels.reshape(-1))
    target = int(torch.where(counts < labels.numel() / 2, counts, 0).argmax())
    assert counts[target] > 0
    region = (labels == target).numpy()
    black = twin.spec.normalization.normalize(torch.zeros(1, 3, 1, 1)).reshape(3)
    vgatt = VGattMap(twin.model).attribute(inputs, target, region)
    most = pixel_removal(twin.model, inputs, target, region, vgatt, black)
    cam = upsample(GradCam(twin.model, "decoders.0.2").attribute(inputs, target, region), (96, 128))
    baseline = pixel_removal(twin.model, inputs, target, region, cam, black)
    assert [p.fraction for p in most] == [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08]
    assert all(0 <= p.label_change <= 1 and p.score_change >= 0 for p in most)
    # compared over the whole removal curve (its mean: the area under it), not at one noisy point
    for figure in ("score_change", "label_change"):
        assert np.mean([getattr(p, figure) for p in most]) > np.mean([getattr(p, figure) for p in baseline]), figure
    occlusion = OcclusionMap(twin.model, window=16, stride=8).attribute(inputs, target, region)
    assert occlusion.shape == (96, 128) and np.abs(occlusion).max() > 0
    with pytest.raises(ValueError, match="upsample it first"):
        pixel_removal(twin.model, inputs, target, region, vgatt[:10], black)


def test_seeds_follow_section_4_4():
    cat = np.array([[5.0, 4.0, 0.5, -1.0], [1.0, 0.0, -2.0, -1.0]])
    dog = np.array([[2.0, 0.0, 3.0, -1.0], [9.0, 10.0, -1.0, 2.0]])
    seeds = attribution_seeds({1: cat, 2: dog}, k=0.15, background=0)
    # cat seeds: >= 0.75 -> (0,0),(0,1),(1,0); dog seeds: >= 1.5 -> (0,0),(0,2),(1,0),(1,1),(1,3)
    # overlaps (0,0),(1,0) go to the smaller seed (cat, 3 px < 5 px); negative for both -> background
    expected = np.array([[1, 1, 2, 0], [1, 2, 0, 2]])
    np.testing.assert_array_equal(seeds, expected)
    only_cat = attribution_seeds({1: cat}, k=0.9)
    assert (only_cat == 1).sum() == 1 and (only_cat == UNKNOWN).sum() == 7
    truth = np.array([[1, 1, 2, 0], [2, 2, 255, 2]])
    quality = seed_quality(seeds, truth, ignore_index=255)
    assert quality["area_ratio"] == pytest.approx(7 / 7) and quality["pixel_accuracy"] == pytest.approx(6 / 7)
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        attribution_seeds({1: cat}, k=0)


def test_positive_share_inside_the_patch():
    from audit.patch_audit import positive_share_inside

    contributions = np.array([[3.0, -5.0], [1.0, 0.0]])
    inside = np.array([[True, True], [False, False]])
    assert positive_share_inside(contributions, inside) == pytest.approx(3 / 4)  # negatives do not count
    assert np.isnan(positive_share_inside(-np.abs(contributions), inside))
