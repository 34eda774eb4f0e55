"""Campaigns on a device: batched EOT draws (bounds, geometry, identity), per-trial determinism of the attack,
the device policy of `audit campaign` / `vgatt` / `bounds` (refused before any work), a campaign through Ray on
an explicit device, and on CUDA (skipped without one) a trial on the GPU and trials sharing one."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from audit.attack import AttackConfig, class_switch_target, eot_successes, patch_attack
from audit.cli import audit
from audit.patches import EOTConfig, apply_patch_eot, draw_eot, paste, place_patch
from audit.runner import check_device_request
from segmenters.device import DeviceError

no_cuda_here = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


def random_twin(height: int = 64, width: int = 80, device: str = "cpu"):
    """An untrained U-Net twin: determinism and devices, not attack quality, are under test."""
    from segmenters.data import dataset_classes
    from segmenters.models import build_model
    from segmenters.spec import ModelSpec
    from segmenters.twin import Twin

    torch.manual_seed(0)
    spec = ModelSpec(arch="unet", classes=dataset_classes("shapes"), input_size=(height, width), dataset="shapes")
    return Twin(build_model("unet", spec.num_classes).eval().to(device), spec)


def attack_scene(device: str = "cpu", size: int = 12):
    twin = random_twin(device=device)
    image = torch.rand((3, 64, 80), generator=torch.Generator().manual_seed(3))
    obj = np.zeros((64, 80), bool)
    obj[16:48, 20:60] = True
    return twin, image, class_switch_target(obj, 2, 1), (32 - size // 2, 40 - size // 2)


@pytest.fixture(scope="module")
def shapes_twin_path(tmp_path_factory):
    from segmenters.twin import save_twin

    twin = random_twin(128, 128)
    path = tmp_path_factory.mktemp("twin") / "shapes_unet.pt"
    save_twin(path, twin.model, twin.spec)
    return path


def campaign_file(folder: Path, twin: Path, **extra) -> Path:
    path = folder / "campaign.yaml"
    path.write_text(yaml.safe_dump({
        "name": "devices", "models": [str(twin)], "images": {"dataset": "shapes", "split": "val", "count": 1},
        "targets": [{"kind": "switch"}], "patch_sizes": [6, 10], "seeds": [0],
        "attack": {"steps": 3, "eot_samples": 3}, "eot_eval_draws": 5, "eot_eval_batch": 2, **extra}))
    return path


def stored_trials(run: Path) -> list[tuple[str, dict]]:
    if not (run / "trials.sqlite").exists():
        return []
    with sqlite3.connect(run / "trials.sqlite") as db:
        return [(i, json.loads(m)) for i, m in db.execute("SELECT id, metrics FROM trials")]


# ------------------------------------------------------------------------------------------------ batched EOT
def test_batched_eot_stays_in_bounds_and_lands_inside_the_image():
    images = torch.rand((16, 3, 48, 64))
    patch = torch.rand((3, 10, 10), requires_grad=True)
    eot = EOTConfig()
    # area bounds of one draw: scale and perspective (each side moves by up to 2 x perspective x side)
    smallest = (eot.scale[0] * (1 - 2 * eot.perspective)) ** 2 * 100
    largest = (eot.scale[1] * (1 + 2 * eot.perspective)) ** 2 * 100
    for top, left in ((0, 0), (38, 54), (19, 27)):  # two corners and the middle
        patched, masks = apply_patch_eot(images, patch, top, left, eot, torch.Generator().manual_seed(top))
        assert patched.shape == images.shape and masks.shape == (16, 1, 48, 64)
        patched_values, coverage = patched.detach(), masks.detach()
        assert 0 <= float(patched_values.min()) and float(patched_values.max()) <= 1
        assert 0 <= float(coverage.min()) and float(coverage.max()) <= 1
        # every draw lands in the image: at a corner, rotation may clip a little of it, never most
        area = coverage.sum(dim=(1, 2, 3))
        assert (area > 0.75 * smallest).all() and (area < largest).all(), area
        # and nothing changes where no draw can reach
        far = torch.ones((48, 64), dtype=torch.bool)
        far[max(0, top - 12):top + 22, max(0, left - 12):left + 22] = False
        assert torch.equal(patched_values[:, :, far], images[:, :, far]) and not coverage[:, 0][:, far].any()
    patched.sum().backward()
    assert patch.grad is not None and patch.grad.abs().sum() > 0


def test_identity_eot_is_paste_and_a_fixed_geometry_resamples_exactly():
    images = torch.rand((3, 3, 40, 50))
    patch = torch.rand((3, 8, 8))
    nominal, mask = paste(images, patch, 10, 20)
    identity, masks = apply_patch_eot(images, patch, 10, 20, EOTConfig.none(), torch.Generator().manual_seed(0))
    assert torch.equal(identity, nominal) and torch.equal(masks[:, 0], mask[None].float().expand(3, -1, -1))
    # only contrast varies: the warp is the identity and must put each pixel where `paste` does
    contrast_only = EOTConfig(jitter_px=0, scale=(1.0, 1.0), rotation_deg=0, perspective=0, brightness=0,
                              contrast=0.2, noise_std=0)
    draws = draw_eot(3, 8, contrast_only, torch.Generator().manual_seed(1))
    varied, varied_masks = place_patch(images, patch, 10, 20, contrast_only, draws)
    expected = torch.stack([paste(images[i:i + 1], ((patch - 0.5) * c + 0.5).clamp(0, 1), 10, 20)[0][0]
                            for i, c in enumerate(draws.contrast)])
    assert torch.allclose(varied, expected, atol=1e-6) and torch.allclose(varied_masks, masks, atol=1e-6)
    assert not torch.allclose(varied, nominal, atol=1e-3)  # the draws did vary the contrast


def test_scale_and_rotation_keep_the_drawn_area():
    """Without perspective a draw is a rotated square of side size * scale: its coverage sums to that area."""
    eot = EOTConfig(perspective=0.0, rotation_deg=45, jitter_px=3)
    draws = draw_eot(12, 16, eot, torch.Generator().manual_seed(0))
    _, masks = place_patch(torch.rand((12, 3, 96, 128)), torch.rand((3, 16, 16)), 40, 50, eot, draws)
    area = masks.sum(dim=(1, 2, 3)) / (16 * draws.scale) ** 2
    assert torch.allclose(area, torch.ones(12), atol=0.01), area
    assert len({round(float(s), 4) for s in draws.scale}) == 12  # each draw has its own scale


def test_draws_do_not_depend_on_how_they_are_batched():
    eot = EOTConfig()
    images = torch.rand((6, 3, 40, 50))
    patch = torch.rand((3, 8, 8))
    draws = draw_eot(6, 8, eot, torch.Generator().manual_seed(5))
    whole, _ = place_patch(images, patch, 12, 20, eot, draws)
    parts = [place_patch(images[i:i + 2], patch, 12, 20, eot, draws[i:i + 2])[0] for i in (0, 2, 4)]
    assert torch.equal(whole, torch.cat(parts))
    with pytest.raises(ValueError, match="6 EOT draws for 2 images"):
        place_patch(images[:2], patch, 12, 20, eot, draws)
    with pytest.raises(ValueError, match="0 < low <= high"):
        EOTConfig(scale=(1.1, 0.9))
    with pytest.raises(ValueError, match="less than 0.25"):
        EOTConfig(perspective=0.3)


def test_eot_successes_are_measured_per_draw_in_batches():
    twin, image, target, (top, left) = attack_scene()
    patch = torch.rand((3, 12, 12))
    one_at_a_time = eot_successes(twin, image, patch, top, left, target, EOTConfig(), 5, seed=1, batch=1)
    assert len(one_at_a_time) == 5 and all(0 <= s <= 1 for s in one_at_a_time)
    batched = eot_successes(twin, image, patch, top, left, target, EOTConfig(), 5, seed=1, batch=4)
    assert np.allclose(batched, one_at_a_time, atol=0.02)  # the same draws; batching may move a rounding
    assert eot_successes(twin, image, patch, top, left, target, EOTConfig(), 0, seed=1) == []
    with pytest.raises(ValueError, match="batch must be >= 1"):
        eot_successes(twin, image, patch, top, left, target, EOTConfig(), 5, seed=1, batch=0)


# ------------------------------------------------------------------------------------------------ determinism
def test_the_same_seed_gives_the_same_patch_and_another_seed_another():
    twin, image, target, (top, left) = attack_scene()
    config = AttackConfig(steps=4, eot_samples=8)  # 8 draws of the default distribution, one batch per step
    first = patch_attack(twin, image, target, 12, top, left, config, seed=0)
    again = patch_attack(twin, image, target, 12, top, left, config, seed=0)
    other = patch_attack(twin, image, target, 12, top, left, config, seed=1)
    assert np.array_equal(first.patch, again.patch) and first.losses == again.losses
    assert first.successes == again.successes and len(first.losses) == first.steps == 4
    assert not np.array_equal(first.patch, other.patch)
    assert first.patch.shape == (3, 12, 12) and 0 <= first.patch.min() and first.patch.max() <= 1
    # the host-copy-free bookkeeping reports what a per-step callback sees
    seen = []
    patch_attack(twin, image, target, 12, top, left, config, seed=0, progress=lambda *step: seen.append(step))
    assert [success for _, _, success in seen] == first.successes
    assert np.allclose([loss for _, loss, _ in seen], first.losses)


# ------------------------------------------------------------------------------------------------ device policy
def test_device_requests_the_tasks_cannot_meet_are_refused():
    with pytest.raises(DeviceError, match="'cuda' was asked for, but each task gets no GPU"):
        check_device_request("cuda", 0.0, local=False)
    with pytest.raises(DeviceError, match="'cuda:1' was asked for, but each task gets 1 GPU"):
        check_device_request("cuda:1", 0.5, local=False)
    with pytest.raises(DeviceError, match="unknown device 'gpu'"):
        check_device_request("gpu", 1.0, local=False)
    for fine in (("auto", 0.0), ("cpu", 0.0), ("auto", 0.25), ("cuda", 0.25), ("cuda:1", 2.0)):
        check_device_request(*fine, local=False)


@no_cuda_here
def test_cuda_on_a_machine_without_it_is_refused_before_any_trial(shapes_twin_path, tmp_path):
    runner = CliRunner()
    config = campaign_file(tmp_path, shapes_twin_path)
    run = tmp_path / "run"
    result = runner.invoke(audit, ["campaign", str(config), "--out", str(run), "--device", "cuda",
                                   "--gpus-per-trial", "1", "--quiet"])
    assert result.exit_code != 0 and "device 'cuda' was asked for" in result.output, result.output
    assert not run.exists()  # nothing started, nothing stored
    # the same from the campaign file
    in_file = campaign_file(tmp_path, shapes_twin_path, device="cuda:0")
    result = runner.invoke(audit, ["campaign", str(in_file), "--out", str(run), "--gpus-per-trial", "1"])
    assert result.exit_code != 0 and "device 'cuda:0' was asked for" in result.output and not run.exists()
    # CUDA with no GPU per trial, on a cluster elsewhere: refused before the driver even connects
    result = runner.invoke(audit, ["campaign", str(config), "--out", str(run), "--device", "cuda",
                                   "--address", "127.0.0.1:9", "--quiet"])
    assert result.exit_code != 0 and "each task gets no GPU" in result.output and not run.exists()
    result = runner.invoke(audit, ["campaign", str(config), "--out", str(run), "--device", "gpu"])
    assert result.exit_code != 0 and "unknown device 'gpu'" in result.output
    bad = campaign_file(tmp_path, shapes_twin_path, device="tpu")
    result = runner.invoke(audit, ["campaign", str(bad), "--out", str(run)])
    assert result.exit_code != 0 and "device: Value error, unknown device 'tpu'" in result.output
    result = runner.invoke(audit, ["vgatt", str(run), "--device", "cuda", "--gpus-per-trial", "1"])
    assert result.exit_code != 0 and "device 'cuda' was asked for" in result.output and not run.exists()
    result = runner.invoke(audit, ["bounds", "--arch", "unet", "--patch", "2", "--device", "cuda"])
    assert result.exit_code != 0 and "device 'cuda' was asked for" in result.output


@pytest.mark.slow
def test_a_gpu_share_the_local_cluster_lacks_is_refused(shapes_twin_path, tmp_path):
    """Trials asking for a GPU on a local cluster without one would wait for ever: refused, nothing stored."""
    from audit.runner import run_campaign

    gpus = torch.cuda.device_count()
    config = campaign_file(tmp_path, shapes_twin_path)
    with pytest.raises(DeviceError, match=rf"device 'auto' with {gpus + 1} GPU\(s\) per task: the Ray cluster "
                                          rf"has {gpus} GPU\(s\)"):
        run_campaign(config, tmp_path / "run", num_gpus=gpus + 1, local_cpus=1, progress=False)
    assert stored_trials(tmp_path / "run") == []


@pytest.mark.slow
def test_a_job_on_a_cluster_without_the_gpus_waits_then_refuses(shapes_twin_path, tmp_path):
    """A job on a joined cluster gives the autoscaler `--gpu-wait` seconds to add a GPU node, then refuses."""
    from serving.cluster import start_head

    gpus = torch.cuda.device_count()
    config = campaign_file(tmp_path, shapes_twin_path)
    run = tmp_path / "run"
    head = start_head(num_cpus=1)  # this test's own cluster, stopped alone
    try:
        job = head.submit(["audit", "campaign", str(config), "--out", str(run), "--gpus-per-trial", str(gpus + 1),
                           "--gpu-wait", "1", "--quiet"])
    finally:
        head.stop()
    output = job.stdout + job.stderr
    assert job.returncode != 0 and f"with {gpus + 1} GPU(s) per task" in output and "after 1 s" in output, output[-3000:]
    assert stored_trials(run) == []


# ------------------------------------------------------------------------------------------------ through Ray
@pytest.mark.slow
def test_a_campaign_on_an_explicit_device_and_resubmitted_on_another(shapes_twin_path, tmp_path):
    from audit.campaign import expand, load_campaign
    from audit.runner import run_campaign

    config = campaign_file(tmp_path, shapes_twin_path, device="cpu")
    run = tmp_path / "run"
    summary = run_campaign(config, run, local_cpus=2, progress=False)
    trials = expand(load_campaign(config))
    assert summary["failed"] == 0 and summary["stored"] == len(trials) == 2 and summary["device"] == "cpu"
    stored = dict(stored_trials(run))
    assert sorted(stored) == sorted(t.id for t in trials)
    for metrics in stored.values():
        assert metrics["device"] == "cpu" and metrics["eot_draws"] == 5 and metrics["steps"] == 3
    # the device is not part of a trial's id: resubmitted elsewhere, nothing is redone
    again = run_campaign(config, run, local_cpus=2, progress=False, device="auto")
    assert again["already_stored"] == len(trials) and again["stored"] == 0 and again["device"] == "auto"


# ------------------------------------------------------------------------------------------------ on CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("eot_samples", [1, 8])
def test_attack_on_cuda_repeats_itself(eot_samples):
    twin, image, target, (top, left) = attack_scene("cuda")
    config = AttackConfig(steps=5, eot_samples=eot_samples)
    first = patch_attack(twin, image.cuda(), target, 12, top, left, config, seed=0)
    again = patch_attack(twin, image, target, 12, top, left, config, seed=0)
    assert np.array_equal(first.patch, again.patch) and first.losses == again.losses
    assert not np.array_equal(first.patch, patch_attack(twin, image, target, 12, top, left, config, seed=1).patch)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_trial_runs_on_cuda_and_vgatt_stays_exact_there(shapes_twin_path, tmp_path):
    from audit.campaign import expand, load_campaign
    from audit.patch_audit import audit_trial
    from audit.trial import execute_trial

    config = load_campaign(campaign_file(tmp_path, shapes_twin_path, device="cuda"))
    trial = expand(config)[0]
    result = execute_trial(config.model_dump_json(), trial)
    assert result["metrics"]["device"].startswith("cuda:0")
    again = execute_trial(config.model_dump_json(), trial, torch.device("cuda", 0))
    assert np.array_equal(result["artefacts"]["patch.npy"], again["artefacts"]["patch.npy"])
    from audit.store import TrialStore

    with TrialStore(tmp_path / "run") as store:
        store.save_campaign("", config.model_dump_json())
        store.record(trial.as_dict(), result["metrics"], result["artefacts"])
        (row,) = store.rows()
    audited = audit_trial(config.model_dump_json(), row, str(tmp_path / "run"), torch.device("cuda", 0))
    assert audited["metrics"]["device"].startswith("cuda:0")
    if audited["metrics"]["target_class"] is not None:
        assert audited["metrics"]["completeness_error_attacked"] < 1e-9


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_trials_share_one_gpu_through_fractional_gpus(shapes_twin_path, tmp_path):
    from audit.runner import run_campaign

    config = campaign_file(tmp_path, shapes_twin_path, device="cuda")
    summary = run_campaign(config, tmp_path / "run", num_gpus=0.5, local_cpus=2, progress=False)
    assert summary["failed"] == 0 and summary["stored"] == 2
    assert all(metrics["device"].startswith("cuda:0") for _, metrics in stored_trials(tmp_path / "run"))
