"""The figures behind the CamVid reports (bench/camvid_runs.py). Paired tests: differences are second - first over
the seeds or images both runs have, the sign-flip test is exact for a few seeds, a run against itself shows nothing.
Training time: from the epochs' own seconds, or a lower bound from the logged pieces. Where and in what precision:
from the epochs and the pieces both."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import bench_module

runs = bench_module("camvid_runs")


def test_paired_by_seed_differences_are_second_minus_first_over_common_seeds():
    first = {0: 0.50, 1: 0.52, 2: 0.51, 5: 0.40}
    second = {0: 0.55, 1: 0.54, 2: 0.56, 3: 0.70}
    result = runs.paired_by_seed(first, second)
    assert result["seeds"] == [0, 1, 2]
    assert result["differences"] == pytest.approx([0.05, 0.02, 0.05])
    assert result["mean_difference"] == pytest.approx(0.04)
    # three positive differences: 2 of the 8 sign patterns reach |mean| >= the observed one
    assert result["sign_flip_p"] == pytest.approx(2 / 8)
    assert "exact" in result["sign_flip"]
    # t = 0.04 / (0.01732 / sqrt(3)) = 4 on 2 degrees of freedom: two-sided p = 1 - t / sqrt(2 + t^2)
    assert result["t_test_p"] == pytest.approx(1 - 4 / np.sqrt(18), rel=1e-6)


def test_sign_flip_p_counts_every_pattern_at_least_as_extreme():
    differences = np.array([1.0, -1.0, 2.0, 3.0])
    p, how = runs.sign_flip_p(differences)
    # |sum| >= 5 of 16 patterns: (+,+,+,+)=7, (-,+,+,+)=5, (+,-,+,+)=5 and their mirrors
    assert p == pytest.approx(6 / 16)
    assert "exact" in how


def test_paired_by_image_drops_unscored_images_and_counts_sides():
    first = [0.5, 0.6, None, 0.7, 0.4, 0.3, 0.2, 0.8]
    second = [0.6, 0.7, 0.9, None, 0.5, 0.4, 0.3, 0.7]
    result = runs.paired_by_image(first, second)
    assert result["images"] == 6
    assert (result["second_better"], result["first_better"]) == (5, 1)
    assert result["median_difference"] == pytest.approx(0.1)
    assert 0 < result["p"] < 1


def test_a_run_against_itself_has_no_test():
    scores = [0.5, 0.6, 0.7]
    by_image = runs.paired_by_image(scores, scores)
    assert by_image["p"] is None and "undefined" in by_image["test"]
    by_seed = runs.paired_by_seed({0: 0.5, 1: 0.6}, {0: 0.5, 1: 0.6})
    assert by_seed["t_test_p"] is None and by_seed["sign_flip_p"] == pytest.approx(1.0)


def test_train_time_adds_the_epochs_and_falls_back_to_the_logged_pieces_as_a_lower_bound():
    pieces = [{"train_seconds_this_run": 100.0}, {"train_seconds_this_run": 50.5}]
    timed = {"history": [{"epoch": 1, "seconds": 30.2}, {"epoch": 2, "seconds": 29.9}], "pieces": pieces[:1]}
    assert runs.train_time(timed) == "60"
    untimed = {"history": [{"epoch": 1}, {"epoch": 2, "seconds": 29.9}], "pieces": pieces}
    assert runs.train_time(untimed) == ">= 150 (pieces logged)"
    assert runs.train_time({"history": [{"epoch": 1}], "pieces": []}) == "n/a"


def test_trained_on_names_each_device_and_precision_once_including_pieces_killed_before_their_end():
    killed_piece = {"history": [{"epoch": 1, "device": "cpu", "amp": "bf16"}, {"epoch": 2, "device": "cpu",
                                                                             "amp": "bf16"}], "pieces": []}
    older = {"history": [{"epoch": 1}], "pieces": [{"device": "cuda", "amp": None}, {"device": "cpu", "amp": "off"}]}
    assert runs.trained_on({"a": killed_piece}) == ["cpu (bf16)"]
    assert runs.trained_on({"a": killed_piece, "b": older}) == ["cpu (bf16)", "cpu (off)", "cuda (off)"]
    assert runs.trained_on({}) == []
