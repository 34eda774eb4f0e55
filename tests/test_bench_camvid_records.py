"""A CamVid plan adds up over machines that keep nothing: bench/camvid_semeda.py records each finished run (config,
history, pieces, final evaluation; no weights), never trains a recorded run again, reports it from its record once
its weights are gone, and refuses a record of another run. A real (tiny) run on real CamVid frames."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BENCH, bench_module

#: a budget of two optimiser steps on small frames, evaluated on two val images
TINY = ["--plan", "losses", "--losses", "ppce", "--arch", "lraspp_mobilenetv3", "--size", "48x64", "--epochs", "1",
        "--max-steps", "2", "--eval-every", "1", "--batch-size", "2", "--val-limit", "2", "--threads", "1",
        "--workers", "0", "--device", "cpu", "--quiet"]


def semeda(tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(BENCH / "camvid_semeda.py"), *TINY, "--runs", str(tmp / "runs"),
               "--records", str(tmp / "records"), "--out", str(tmp / "report"), *extra]
    return subprocess.run(command, cwd=BENCH.parent, capture_output=True, text=True, timeout=900)


def report(tmp: Path) -> dict:
    return json.loads((tmp / "report" / "comparison.json").read_text())["runs"]["ppce"]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, data_root) -> tuple[Path, dict]:
    """A plan of one run, trained and reported here; then its weights' folder removed, as a new machine has it."""
    tmp = tmp_path_factory.mktemp("camvid_records")
    first = semeda(tmp)
    assert first.returncode == 0, first.stderr[-3000:]
    trained = report(tmp)
    shutil.rmtree(tmp / "runs")
    return tmp, trained


def test_a_finished_run_leaves_a_record_without_weights(recorded):
    tmp, trained = recorded
    record = tmp / "records" / "ppce"
    names = sorted(path.name for path in record.iterdir())
    assert names == sorted(bench_module("camvid_runs").RECORD_FILES)
    assert trained["state"] == "done" and 0.0 <= trained["metrics"]["miou"] <= 1.0
    assert len(trained["per_image_miou"]) == 2
    assert json.loads((record / "history.json").read_text())[-1]["step"] == 2


def test_a_recorded_run_is_listed_as_recorded_and_is_not_trained_again(recorded):
    tmp, _ = recorded
    listed = semeda(tmp, "--list")
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert listed.stdout.split()[:2] == ["ppce", "recorded"]
    again = semeda(tmp)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "ppce: recorded (trained elsewhere), skipped" in again.stdout
    assert not (tmp / "runs" / "ppce" / "last.pt").exists()


def test_the_report_reads_a_recorded_run_from_its_record(recorded):
    tmp, trained = recorded
    result = semeda(tmp, "--report-only")
    assert result.returncode == 0, result.stderr[-3000:]
    again = report(tmp)
    assert again["state"] == "recorded"
    assert again["metrics"] == trained["metrics"]
    assert again["per_image_miou"] == trained["per_image_miou"]
    assert again["pieces"] == trained["pieces"] and again["convergence"] == trained["convergence"]


def test_a_record_of_another_run_is_refused_naming_what_differs(recorded):
    tmp, _ = recorded
    result = semeda(tmp, "--lr", "0.001", "--list")
    assert result.returncode != 0
    assert "holds another run: lr=0.003 (plan: 0.001)" in result.stderr


def test_train_only_trains_and_leaves_evaluation_and_record_to_a_later_report(tmp_path, data_root):
    """--train-only (trainers side by side, bench/gpu_fair.py): weights and history, no final evaluation, record or
    report; the next --report-only evaluates and records the run."""
    trained = semeda(tmp_path, "--train-only")
    assert trained.returncode == 0, trained.stderr[-3000:]
    run = tmp_path / "runs" / "ppce"
    assert (run / "last.pt").is_file() and json.loads((run / "history.json").read_text())[-1]["step"] == 2
    assert not (run / "final_eval.json").exists()
    assert not (tmp_path / "records" / "ppce").exists() and not (tmp_path / "report" / "comparison.json").exists()
    reported = semeda(tmp_path, "--report-only")
    assert reported.returncode == 0, reported.stderr[-3000:]
    assert (tmp_path / "records" / "ppce" / "final_eval.json").is_file()
    assert report(tmp_path)["state"] == "done"
