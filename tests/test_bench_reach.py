"""bench/reach_2x2.py attacks the strongest fair-plan twin whose weights are on this machine: a stronger run recorded
on another machine (no weights) is named, not attacked, and no weights anywhere is a clear error. Its campaign has at
least --min-trials attempts, the trials of a smaller one among them."""

from __future__ import annotations

import json

import pytest

from audit.campaign import CampaignConfig, expand
from conftest import bench_module

reach = bench_module("reach_2x2")


def write_report(path, scores: dict[str, float | None]):
    runs = {name: {"metrics": {"miou": miou} if miou is not None else None} for name, miou in scores.items()}
    path.write_text(json.dumps({"runs": runs}))


def test_the_strongest_run_with_weights_here_is_attacked_and_a_stronger_one_without_is_named(tmp_path, capsys):
    report, runs = tmp_path / "comparison.json", tmp_path / "runs"
    write_report(report, {"ppce_s0": 0.59, "ppce_s2": 0.585, "semeda_s0": 0.57, "sobel_s0": None})
    for name in ("ppce_s2", "semeda_s0", "sobel_s0"):  # sobel_s0: unfinished, weights but no metrics
        (runs / name).mkdir(parents=True)
        (runs / name / "last.pt").write_bytes(b"")
    assert reach.strongest_twin(report, runs) == runs / "ppce_s2" / "last.pt"
    printed = capsys.readouterr().out
    assert "strongest twin here: ppce_s2 (val mIoU 58.5 %)" in printed
    assert "without weights here: ppce_s0 (val mIoU 59.0 %)" in printed


def test_no_weights_for_any_finished_run_is_a_clear_error(tmp_path):
    report = tmp_path / "comparison.json"
    write_report(report, {"ppce_s0": 0.59})
    with pytest.raises(SystemExit, match="no finished run .* has its weights"):
        reach.strongest_twin(report, tmp_path / "runs")
    with pytest.raises(SystemExit, match="no .*comparison.json"):
        reach.strongest_twin(tmp_path / "comparison.json.missing", tmp_path / "runs")


def test_frames_are_added_until_the_campaign_has_enough_trials_and_the_first_frames_trials_stay(tmp_path, data_root):
    args = reach.parse_args(["--images", "2", "--data-root", str(data_root)])
    document = reach.campaign_document(args, tmp_path / "not_trained_yet.pt")  # classes: CamVid's own table
    few = expand(CampaignConfig.model_validate(document))
    grown = reach.with_enough_trials(document, len(few) + 5)
    trials = expand(CampaignConfig.model_validate(grown))
    assert grown["images"]["count"] > 2 and len(trials) >= len(few) + 5
    assert [t.id for t in trials[:len(few)]] == [t.id for t in few]  # a rerun with more frames continues the first
    fewer = {**grown, "images": {**grown["images"], "count": grown["images"]["count"] - 1}}
    assert len(expand(CampaignConfig.model_validate(fewer))) < len(few) + 5  # no frame more than it takes
    assert reach.with_enough_trials(document, len(few)) == document


def test_a_trial_target_is_named_in_the_twins_classes():
    names = ["Sky", "Building", "Pole", "Road", "Pavement"]
    assert reach.target_label({"target": "disappear", "source_class": 3, "to_class": None}, names) == "Road disappears"
    assert reach.target_label({"target": "switch", "source_class": 4, "to_class": 3}, names) == "Pavement -> Road"
