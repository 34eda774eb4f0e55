import json
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from patchwatch.cli import main
from segmenters.training import TrainConfig, train
from segmenters.twin import load_twin, read_checkpoint

pytestmark = pytest.mark.slow

TINY = dict(size=(48, 48), train_length=24, val_length=8, batch_size=8, semeda_pretrain_batches=5, threads=2,
            eval_every=1, compile=False)


def test_a_killed_run_resumes_to_the_same_weights(tmp_path):
    config = dict(TINY, train_length=48, epochs=4)
    reference = train(TrainConfig(out=str(tmp_path / "reference"), **config), progress=False)
    assert reference["steps"] == 24 and reference["epochs"] == 4

    killed = tmp_path / "killed"
    command = [
        sys.executable, "-m", "patchwatch.cli", "train", "--size", "48x48", "--train-length", "48",
        "--val-length", "8", "--batch-size", "8", "--epochs", "4", "--threads", "2", "--eval-every", "1",
        "--no-compile", "--quiet", "--out", str(killed),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not (killed / "last.pt").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.kill()  # SIGKILL: no cleanup, as when a machine dies
    process.wait()
    stopped_at = read_checkpoint(killed / "last.pt")["epoch"]
    assert 1 <= stopped_at < 4, "the run should have been killed part-way"

    resumed = train(TrainConfig(out=str(killed), **config), resume=True, progress=False)
    assert resumed["epochs"] == 4 and resumed["steps"] == 24
    a = read_checkpoint(tmp_path / "reference" / "last.pt")["model"]
    b = read_checkpoint(killed / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    history = json.loads((killed / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4] and all("val_miou" in h for h in history)
    # every epoch keeps its own time, the killed piece's too (train() never reported that piece)
    assert all(h["seconds"] > 0 for h in history)
    assert (killed / "history.png").stat().st_size > 0
    twin = load_twin(tmp_path / "reference" / "best.pt")
    assert twin.spec.arch == "unet" and twin.spec.dataset == "shapes" and twin.spec.input_size == (48, 48)


def test_a_run_validated_less_often_ends_with_the_same_weights_and_batch_norm_statistics(tmp_path):
    """Batch norm is recalibrated only at validated epochs; it starts from nothing each time and training never reads
    the running statistics, so a run validated at every epoch and one validated at its first and last end equal."""
    config = dict(TINY, epochs=3)
    train(TrainConfig(out=str(tmp_path / "every"), **config), progress=False)
    train(TrainConfig(out=str(tmp_path / "ends"), **dict(config, eval_every=5)), progress=False)
    every = read_checkpoint(tmp_path / "every" / "last.pt")
    ends = read_checkpoint(tmp_path / "ends" / "last.pt")
    assert [h.get("val_miou") is not None for h in ends["history"]] == [True, False, True]
    statistics = [k for k in every["model"] if k.endswith(("running_mean", "running_var"))]
    assert statistics and all(torch.equal(every["model"][k], ends["model"][k]) for k in every["model"])
    assert every["history"][-1]["val_miou"] == ends["history"][-1]["val_miou"]


def test_resume_refuses_a_different_run(tmp_path):
    train(TrainConfig(epochs=1, out=str(tmp_path), **TINY), progress=False)
    with pytest.raises(ValueError, match="loss='ppce'"):
        train(TrainConfig(epochs=2, out=str(tmp_path), loss="sobel", **TINY), resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(TrainConfig(epochs=1, out=str(tmp_path / "fresh"), **TINY), resume=True, progress=False)


def test_semeda_training_records_the_edge_network(tmp_path):
    summary = train(TrainConfig(epochs=1, loss="semeda", out=str(tmp_path), **TINY), progress=False)
    assert summary["semeda_net"]["pixel_accuracy"] > 0.5
    checkpoint = read_checkpoint(tmp_path / "last.pt")
    assert checkpoint["semeda_net"] is not None
    assert "semeda_l1" in checkpoint["history"][0]


def test_cli_train_then_eval_writes_report_and_overlays(tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(
        main,
        ["train", "--size", "48x48", "--train-length", "16", "--val-length", "8", "--epochs", "1",
         "--batch-size", "8", "--no-compile", "--out", str(out), "--quiet"],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["steps"] == 2
    result = runner.invoke(
        main, ["eval", str(out / "last.pt"), "--length", "6", "--overlays", "3", "--out", str(tmp_path / "ev"),
               "--quiet"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["images"] == 6 and 0.0 <= report["miou"] <= 1.0
    assert set(report["per_class"]) == {"background", "cube", "sphere", "cylinder"}
    assert [row["band_width"] for row in report["trimap"]] == [1, 2, 3, 5, 10, 20]
    assert len(list((tmp_path / "ev" / "overlays").glob("*.png"))) == 3
    assert (tmp_path / "ev" / "trimap.png").is_file()


def test_cli_errors_are_clear(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["train", "--arch", "segformer", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "unknown architecture 'segformer'" in result.output
    result = runner.invoke(main, ["train", "--size", "big"])
    assert result.exit_code != 0 and "HEIGHTxWIDTH" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochz: 3\n")
    result = runner.invoke(main, ["train", "--config", str(bad)])
    assert result.exit_code != 0 and "epochz" in result.output
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"nope")
    result = runner.invoke(main, ["eval", str(junk)])
    assert result.exit_code != 0 and "junk.pt" in result.output


def test_audit_entry_point_is_the_patchwatch_audit_group():
    from audit.cli import audit

    assert main.commands["audit"] is audit
