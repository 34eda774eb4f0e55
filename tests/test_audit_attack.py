"""The patch attack of seed 000: geometry (largest inscribed rectangle, placement), the EOT placement path,
the momentum iterative method on a real CamVid twin, targets and trial measurements."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from audit.attack import (IGNORE, AttackConfig, attack_precision, class_switch_target, disappear_target, mask_target,
                          measure_trial, patch_attack, success_rate)
from audit.patches import (EOTConfig, Rect, apply_patch_eot, largest_inscribed_rectangle, paste, patch_position,
                           pool_patch)
from segmenters.device import native_bf16


def brute_force_rectangle_area(mask: np.ndarray) -> int:
    best = 0
    height, width = mask.shape
    for top in range(height):
        for left in range(width):
            for bottom in range(top, height):
                for right in range(left, width):
                    if mask[top:bottom + 1, left:right + 1].all():
                        best = max(best, (bottom - top + 1) * (right - left + 1))
    return best


def test_largest_inscribed_rectangle_is_the_largest():
    rng = np.random.default_rng(0)
    for trial in range(60):
        mask = rng.random((7, 9)) < (0.5 + 0.4 * (trial % 2))
        rect = largest_inscribed_rectangle(mask)
        area = brute_force_rectangle_area(mask)
        if area == 0:
            assert rect is None
            continue
        assert rect.area == area
        assert mask[rect.top:rect.top + rect.height, rect.left:rect.left + rect.width].all()
    assert largest_inscribed_rectangle(np.zeros((4, 4), bool)) is None


def test_patch_sits_in_the_middle_of_the_rectangle():
    mask = np.zeros((40, 60), bool)
    mask[10:30, 20:50] = True  # the rectangle
    mask[0:3, 0:60] = True  # a thin strip: larger bounding box, smaller rectangle
    assert largest_inscribed_rectangle(mask) == Rect(10, 20, 20, 30)
    top, left = patch_position(mask, 6)
    assert (top, left) == (17, 32) and mask[top:top + 6, left:left + 6].all()
    edge = np.zeros((20, 20), bool)
    edge[0:2, 0:2] = True
    assert patch_position(edge, 5) == (0, 0)  # kept inside the image
    with pytest.raises(ValueError, match="empty"):
        patch_position(np.zeros((5, 5), bool), 2)


def test_pooling_and_paste():
    patch = torch.rand((3, 5, 5))
    pooled = pool_patch(patch)
    assert pooled.shape == patch.shape
    assert torch.allclose(pooled[:, 1, 1], patch[:, 1:3, 1:3].mean(dim=(1, 2)))
    assert torch.allclose(pooled[:, 4, 4], patch[:, 4, 4])  # replicate padding at the far edge
    images = torch.zeros((2, 3, 20, 30))
    patched, mask = paste(images, patch, 4, 7)
    assert torch.equal(patched[1, :, 4:9, 7:12], patch) and mask.sum() == 25 and images.abs().sum() == 0


def test_eot_placement_is_bounded_and_differentiable():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand((4, 3, 48, 64))
    patch = torch.rand((3, 8, 8), requires_grad=True)
    patched, masks = apply_patch_eot(images, patch, 20, 28, EOTConfig(), generator)
    assert patched.shape == images.shape and masks.shape == (4, 1, 48, 64)
    assert patched.min() >= 0 and patched.max() <= 1
    assert 30 < float(masks[0].sum().detach()) < 110  # about the patch's 64 pixels, rescaled and warped
    differs = [(patched[i] != images[i]).any(0) for i in range(4)]
    assert not all(torch.equal(differs[0], d) for d in differs[1:])  # each draw lands differently
    patched.sum().backward()
    assert patch.grad is not None and patch.grad.abs().sum() > 0
    nominal, _ = apply_patch_eot(images[:1], patch, 20, 28, EOTConfig.none(), generator)
    assert torch.allclose(nominal, paste(images[:1], patch, 20, 28)[0])


@pytest.mark.data
def test_momentum_attack_switches_an_objects_class(attack_scene, camvid_unet_engines):
    twin, image, predicted, obj, source, majority = attack_scene
    target = class_switch_target(obj, majority, source)
    assert success_rate(predicted, target) == 0.0
    top, left = patch_position(obj, 16)
    result = patch_attack(twin, image, target, 16, top, left,
                          AttackConfig(steps=60, step_size=4 / 255, eot=EOTConfig.none(), eot_samples=1,
                                       skip_flipped=False), seed=0)
    assert result.patch.shape == (3, 16, 16) and 0 <= result.patch.min() and result.patch.max() <= 1
    # plain CE over the whole target region descends (with skip_flipped the loss is a mean over the pixels not
    # yet flipped, a shrinking set, so it need not)
    assert result.steps == 60 and result.losses[-1] < result.losses[0]
    # from nothing to a third of the object beyond the patch's own pixels
    assert result.successes[-1] >= 0.35, result.successes[-10:]

    metrics = measure_trial(twin, image, result.patch, top, left, target, EOTConfig(), eot_draws=4)
    assert metrics.success == pytest.approx(result.successes[-1])
    assert metrics.intended_flipped > 0 and metrics.changed >= metrics.intended_flipped + metrics.flipped_outside
    assert 0 < metrics.intended_share <= 1
    # success is counted outside the patch: the patch's own pixels are not its effect
    covered = np.zeros_like(obj)
    covered[top:top + 16, left:left + 16] = True
    outside = obj & ~covered
    assert metrics.intended_flipped <= outside.sum()
    attacked_labels = twin.labels(paste(image[None], torch.as_tensor(result.patch), top, left)[0])[0].numpy()
    assert metrics.success == pytest.approx(success_rate(attacked_labels, target, exclude=covered))
    assert metrics.success_with_patch == pytest.approx(success_rate(
        twin.labels(paste(image[None], torch.as_tensor(result.patch), top, left)[0])[0].numpy(), target))
    assert metrics.area_of_effect == pytest.approx(metrics.changed / 256)
    assert metrics.flip_distance_max >= metrics.flip_distance_mean > 0
    assert 0 <= metrics.eot_success_min <= metrics.eot_success_mean <= 1

    # engine replay: the FP32 ONNX engine flips the same pixels; the FP16 one nearly all of them
    from audit.trial import replay_on_engines

    patched, covered = paste(image[None], torch.as_tensor(result.patch), top, left)
    attacked = twin.labels(patched)[0].numpy()
    replay = replay_on_engines([str(camvid_unet_engines["1"]), str(camvid_unet_engines["2"])], patched.numpy(),
                               predicted, attacked, target, covered.numpy())
    fp32, fp16 = replay["model.onnx"], replay["model.fp16.onnx"]
    assert fp32["precision"] == "fp32" and fp32["reproduces"] is True and fp32["intended_reproduced"] == 1.0
    assert fp32["success"] == pytest.approx(metrics.success) and fp32["agreement_with_twin"] == 1.0
    assert fp16["intended_reproduced"] >= 0.9 and fp16["agreement_with_twin"] > 0.99
    # nothing flipped, nothing to reproduce
    assert replay_on_engines([str(camvid_unet_engines["1"])], image[None].numpy(), predicted, predicted, target,
                             covered.numpy())["model.onnx"]["reproduces"] is None

    # the image's own pixels as the "patch": nothing changes
    own = image[:, top:top + 16, left:left + 16].numpy()
    unchanged = measure_trial(twin, image, own, top, left, target, EOTConfig.none(), eot_draws=1)
    assert unchanged.changed == 0 and unchanged.success == 0.0


def test_auto_precision_is_bf16_only_where_the_device_has_bf16_hardware():
    cpu = torch.device("cpu")
    for precision, autocast in (("fp32", False), ("bf16", True), ("auto", native_bf16(cpu))):
        with attack_precision(precision, cpu):
            assert torch.is_autocast_enabled("cpu") == autocast, precision
            if autocast:
                assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        AttackConfig(precision="fp16")


def test_a_bf16_attack_runs_the_twin_in_bf16_and_is_measured_in_fp32(attack_scene):
    twin, image, predicted, obj, source, majority = attack_scene
    target = class_switch_target(obj, majority, source)
    top, left = patch_position(obj, 16)
    conv = next(module for module in twin.model.modules() if isinstance(module, torch.nn.Conv2d))
    dtypes = []
    handle = conv.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    try:
        result = patch_attack(twin, image, target, 16, top, left,
                              AttackConfig(steps=60, step_size=4 / 255, eot=EOTConfig.none(), eot_samples=1,
                                           skip_flipped=False, precision="bf16"), seed=0)
        after = len(dtypes)
        metrics = measure_trial(twin, image, result.patch, top, left, target, EOTConfig.none(), eot_draws=1)
    finally:
        handle.remove()
    # every forward of the optimisation (two a step: the EOT batch and the nominal check) in bf16, the measurement
    # after it in fp32; the patch itself is fp32 pixels in [0, 1]
    assert after == 2 * 60 and set(dtypes[:after]) == {torch.bfloat16}
    assert set(dtypes[after:]) == {torch.float32}
    assert result.patch.dtype == np.float32 and 0 <= result.patch.min() and result.patch.max() <= 1
    assert result.losses[-1] < result.losses[0]
    # bf16 gradients still find a patch that flips a good part of the object, as the fp32 twin reads it
    assert metrics.success >= 0.25, (metrics.success, result.successes[-10:])


@pytest.mark.data
def test_eot_attack_and_stop_at_success(attack_scene):
    twin, image, predicted, obj, source, majority = attack_scene
    target = class_switch_target(obj, majority, source)
    top, left = patch_position(obj, 24)
    result = patch_attack(twin, image, target, 24, top, left,
                          AttackConfig(steps=80, step_size=4 / 255, eot_samples=2, stop_at_success=0.3), seed=1)
    # it climbs under EOT (the first step leaves it below the bar) and stops at the first step that clears it
    assert result.successes[-1] >= 0.3 and result.steps < 80, result.successes
    assert all(success < 0.3 for success in result.successes[:-1])
    assert len(result.losses) == result.steps


def test_targets(tmp_path, camvid_unet):
    _, twin = camvid_unet
    logits = np.zeros((3, 4, 5), np.float32)
    logits[0] = 1.0
    logits[1, :2] = 2.0  # class 1 wins in the top rows
    logits[2, :2] = 1.5
    gone = disappear_target(logits, 1)
    assert gone.region.sum() == 10 and (gone.labels[:2] == 2).all() and (gone.labels[2:] == IGNORE).all()
    assert success_rate(np.zeros((4, 5), int), gone) == 1.0 and success_rate(np.ones((4, 5), int), gone) == 0.0
    half = np.zeros((4, 5), int)
    half[0] = 1  # the first row still shows the removed class ...
    patch = np.zeros((4, 5), bool)
    patch[0] = True  # ... but it is under the patch
    assert success_rate(half, gone) == 0.5 and success_rate(half, gone, exclude=patch) == 1.0
    assert np.isnan(success_rate(half, gone, exclude=np.ones((4, 5), bool)))  # nothing left to measure
    with pytest.raises(ValueError, match="not predicted anywhere"):
        disappear_target(logits, 2)

    drawn = np.full((4, 5), IGNORE, np.uint8)
    drawn[1:3, 1:4] = 3
    Image.fromarray(drawn).save(tmp_path / "target.png")
    target = mask_target(tmp_path / "target.png", twin.spec.num_classes, (4, 5))
    assert target.kind == "mask" and target.region.sum() == 6
    with pytest.raises(ValueError, match="the image is 6x4"):
        mask_target(tmp_path / "target.png", twin.spec.num_classes, (4, 6))
    drawn[0, 0] = 40
    Image.fromarray(drawn).save(tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"values \[40\] that are not classes"):
        mask_target(tmp_path / "bad.png", twin.spec.num_classes, (4, 5))
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read it"):
        mask_target(tmp_path / "junk.png", twin.spec.num_classes, (4, 5))


def test_physical_check_renders_the_patch_as_a_decal(tmp_path):
    from audit.physical import physical_check
    from segmenters.data import dataset_classes
    from segmenters.data.shapes import render_sample
    from segmenters.models import build_model
    from segmenters.spec import ModelSpec
    from segmenters.twin import Twin

    torch.manual_seed(0)
    spec = ModelSpec(arch="unet", classes=dataset_classes("shapes"), input_size=(128, 128), dataset="shapes")
    twin = Twin(build_model("unet", spec.num_classes).eval(), spec)
    sample = render_sample(0, "val", 0)
    instance = int(np.bincount(sample.instances.reshape(-1))[1:].argmax()) + 1
    patch = np.random.default_rng(0).random((3, 12, 12)).astype(np.float32)
    result = physical_check(twin, "val", 0, instance, patch, to_class=1, image_size=(128, 128), views=4)
    assert result["views"] >= 2 and result["face"] in ("+x", "-x", "+y", "-y", "+z")
    assert 0 < result["decal_size"] < 2  # world units: a 12 px sticker on a CLEVR-sized object
    assert 0 <= result["success_min"] <= result["success_mean"] <= 1 and 0 <= result["baseline_mean"] <= 1
    stickered, predicted = result["panels"][0]
    assert stickered.shape == (128, 128, 3) and predicted.shape == (128, 128)
