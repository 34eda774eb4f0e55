"""Twins that cannot silently collapse (issue 20): batch-norm statistics recomputed before every validation and
save, the one-class check in `patchwatch eval`, the parity gate and campaigns, and step budgets that bound the
whole run (SEMEDA pretraining included) with a best.pt from the first epoch on."""

import copy
import json
import subprocess
import sys
import time

import pytest
import torch
import yaml
from click.testing import CliRunner
from torch.optim.optimizer import register_optimizer_step_post_hook

from audit.campaign import expand, load_campaign
from audit.runner import check_twins
from export.engine import TorchEngine
from export.parity import parity_check, parity_images
from patchwatch.cli import main
from segmenters.data import build_dataset
from segmenters.training import TrainConfig, train
from segmenters.twin import ONE_CLASS_SHARE, TwinHealth, load_twin, read_checkpoint, save_twin, twin_health

#: CamVid pairs the LR-ASPP trains and validates on: a real subset, linked, so that loading stays quick
CAMVID_TRAIN, CAMVID_VAL = 48, 16
#: the size the LR-ASPP trains at: small, so that the test stays short
SIZE = (90, 120)
#: a class given at least this share of the pixels counts as predicted
PREDICTED_SHARE = 0.01


@pytest.fixture(scope="module")
def camvid_root(data_root, tmp_path_factory):
    """The first CAMVID_TRAIN training and CAMVID_VAL validation pairs of the real CamVid, linked into a folder."""
    folder = tmp_path_factory.mktemp("camvid")
    for split, count in (("train", CAMVID_TRAIN), ("val", CAMVID_VAL)):
        for sub in (split, f"{split}annot"):
            (folder / sub).mkdir()
            for path in sorted((data_root / "camvid" / sub).iterdir())[:count]:
                (folder / sub / path.name).symlink_to(path)
    return folder


@pytest.fixture(scope="module")
def short_lraspp(camvid_root, tmp_path_factory):
    """A 30-step LR-ASPP CamVid run, as in issue 20 but shorter: its run folder."""
    out = tmp_path_factory.mktemp("lraspp")
    config = TrainConfig(arch="lraspp_mobilenetv3", dataset="camvid", data_root=str(camvid_root), size=SIZE,
                         batch_size=8, epochs=100, max_steps=30, threads=1, out=str(out))
    assert train(config, progress=False)["steps"] == 30
    return out


@pytest.fixture(scope="module")
def val_images(camvid_root):
    val = build_dataset("camvid", "val", root=camvid_root, size=SIZE)
    return torch.stack([val[i][0] for i in range(len(val))])


def _predicted(shares: dict[str, float]) -> set[str]:
    return {name for name, share in shares.items() if share >= PREDICTED_SHARE}


@torch.no_grad()
def _shares_in_train_mode(twin, images) -> dict[str, float]:
    """What the weights say with each batch norm using these images' own statistics (no running averages); on a
    copy, since a train-mode forward also moves the running averages."""
    model = copy.deepcopy(twin.model).train()
    labels = model(twin.spec.normalization.normalize(images)).argmax(1)
    counts = torch.bincount(labels.flatten(), minlength=twin.spec.num_classes).tolist()
    return {name: count / labels.numel() for name, count in zip(twin.spec.class_names, counts)}


@pytest.mark.slow
def test_a_short_lraspp_run_predicts_more_than_one_class_in_eval_mode(short_lraspp, val_images):
    """MobileNetV3's batch norm keeps 1 % of each batch, so after 30 steps its running averages are still mostly
    their initial values; evaluated with them, this twin said 'Building' for every pixel (checked by running it
    with `bn_recalibration_batches=0`). Recomputed from training batches, eval mode predicts as train mode does."""
    for name in ("best.pt", "last.pt"):
        twin = load_twin(short_lraspp / name)
        in_train_mode = _predicted(_shares_in_train_mode(twin, val_images))
        assert len(in_train_mode) > 1, f"the weights themselves predict only {in_train_mode}"
        health = twin_health(twin, [val_images])
        in_eval_mode = _predicted(health.as_dict()["class_shares"])
        assert len(in_eval_mode) > 1, f"{name}: eval mode predicts only {in_eval_mode}, train mode {in_train_mode}"
        assert not health.one_class
    history = json.loads((short_lraspp / "history.json").read_text())
    assert history[-1]["val_miou"] > 0.1 and all("val_warning" not in record for record in history)


def _collapsed_copy(checkpoint, out, winner: str):
    """The twin of `checkpoint` with its classifier's bias for `winner` raised until that class wins every pixel."""
    twin = load_twin(checkpoint)
    with torch.no_grad():
        twin.model.model.classifier.high_classifier.bias[twin.spec.class_names.index(winner)] += 1e4
    save_twin(out, twin.model, twin.spec)
    return out


@pytest.mark.slow
def test_the_one_class_warning_fires_on_a_collapsed_twin_only(short_lraspp, camvid_root, val_images, tmp_path):
    healthy = short_lraspp / "best.pt"
    collapsed = _collapsed_copy(healthy, tmp_path / "collapsed.pt", "Building")
    health = twin_health(load_twin(collapsed), [val_images])
    assert health.one_class and health.dominant_class == "Building" and health.dominant_share > ONE_CLASS_SHARE
    assert "batch-norm" in health.message() and "too short" in health.message()
    assert twin_health(load_twin(healthy), [val_images]).message() is None

    # patchwatch eval: a WARNING line and the report's `warnings`; the command still succeeds
    runner = CliRunner()
    for checkpoint, fires in ((collapsed, True), (healthy, False)):
        out = tmp_path / f"eval-{checkpoint.stem}"
        result = runner.invoke(main, ["eval", str(checkpoint), "--data-root", str(camvid_root), "--overlays", "0",
                                      "--out", str(out), "--quiet"])
        assert result.exit_code == 0, result.output
        report = json.loads((out / "report.json").read_text())
        assert bool(report["warnings"]) == fires and report["twin_health"]["one_class"] == fires
        assert ("WARNING:" in result.stderr) == fires, result.stderr
        assert json.loads(result.stdout)["warnings"] == report["warnings"]

    # the parity gate: an engine that matches a collapsed twin passes, but the report says what the twin does
    images = parity_images("camvid", count=4, size=SIZE, root=str(camvid_root))
    for checkpoint, fires in ((collapsed, True), (healthy, False)):
        twin = load_twin(checkpoint)
        report = parity_check(TorchEngine(twin), TorchEngine(twin), images, source="camvid")
        assert report.passed and bool(report.warnings) == fires and report.twin_health["one_class"] == fires
        assert ("WARNING:" in report.text()) == fires

    # a campaign's driver checks each twin on the campaign's images before any trial runs
    campaign = tmp_path / "campaign.yaml"
    campaign.write_text(yaml.safe_dump({
        "name": "health", "models": [str(collapsed), str(healthy)],
        "images": {"dataset": "camvid", "root": str(camvid_root), "split": "val", "size": list(SIZE), "count": 2},
        "targets": [{"kind": "disappear", "remove_class": "Car"}], "patch_sizes": [8], "seeds": [0],
        "attack": {"steps": 1}}))
    config = load_campaign(campaign)
    checked = check_twins(config, expand(config))
    assert checked[str(collapsed)]["one_class"] and checked[str(collapsed)]["warning"]
    assert not checked[str(healthy)]["one_class"] and checked[str(healthy)]["warning"] is None


def test_twin_health_from_counts():
    names = ("Sky", "Building", "Road")
    assert TwinHealth.from_counts([0, 960, 40], names, images=2).one_class
    assert not TwinHealth.from_counts([0, 950, 50], names, images=2).one_class  # at the limit: not over it
    assert TwinHealth.from_counts([0, 0, 0], names, images=0).message() is None
    with pytest.raises(ValueError, match="2 pixel counts for 3 classes"):
        TwinHealth.from_counts([1, 2], names, images=1)


#: a tiny SEMEDA run on shapes: 3 training steps an epoch
TINY = dict(size=(48, 48), train_length=24, val_length=8, batch_size=8, threads=1, compile=False, loss="semeda",
            bn_recalibration_batches=2)


@pytest.mark.slow
def test_max_steps_bounds_pretraining_and_training(tmp_path):
    """--max-steps counts every optimiser step: 3 pretraining batches of g_phi, then 4 training steps."""
    steps = []
    handle = register_optimizer_step_post_hook(lambda optimizer, *_: steps.append(optimizer))
    try:
        summary = train(TrainConfig(epochs=10, max_steps=7, semeda_pretrain_batches=3, out=str(tmp_path), **TINY),
                        progress=False)
    finally:
        handle.remove()
    pretraining = [o for o in steps if isinstance(o, torch.optim.Adam) and not isinstance(o, torch.optim.AdamW)]
    assert (len(steps), len(pretraining)) == (7, 3)
    assert (summary["optimizer_steps"], summary["semeda_pretrain_steps"], summary["steps"]) == (7, 3, 4)
    assert [h["step"] for h in json.loads((tmp_path / "history.json").read_text())] == [3, 4]
    with pytest.raises(ValueError, match="max_steps=3 leaves no training step"):
        TrainConfig(max_steps=3, semeda_pretrain_batches=3, **TINY)


@pytest.mark.slow
def test_a_run_stopped_after_its_first_epoch_has_a_best_checkpoint(tmp_path):
    """The default eval_every is 7, but validation also runs after epoch 1: a run killed then keeps a best.pt."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "patchwatch.cli", "train", "--size", "48x48", "--train-length", "24",
               "--val-length", "8", "--batch-size", "8", "--epochs", "14", "--threads", "1", "--loss", "semeda",
               "--semeda-pretrain-batches", "2", "--bn-recalibration-batches", "2", "--quiet", "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600  # a hang guard: the default CPU run compiles its SEMEDA loss first
    while not (out / "last.pt").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.kill()
    _, stderr = process.communicate()
    assert (out / "last.pt").exists(), stderr
    best = read_checkpoint(out / "best.pt")
    assert best["epoch"] >= 1 and best["history"][0]["val_miou"] is not None
    assert "No CUDA runtime" not in stderr  # the CPU run compiles its loss, but no CUDA notice reaches the user
