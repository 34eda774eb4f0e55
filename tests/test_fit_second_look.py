"""How bench/fit_second_look.py labels looks and counts what the detector would catch (bench/ is not an installed
package: loaded from its file)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from conftest import bench_module


@pytest.fixture(scope="module")
def fit():
    return bench_module("fit_second_look")


def test_a_look_is_at_the_patch_only_when_its_blob_appeared_at_or_after_onset_and_it_came_in_time(fit):
    patched, clean = SimpleNamespace(kind="patched", onset=10), SimpleNamespace(kind="smooth", onset=None)
    assert fit.label(clean, 5, 6, within=3) is False
    assert fit.label(patched, 9, 10, within=3) is False  # a blob from before the patch: a negative
    assert fit.label(patched, 10, 11, within=3) is True
    assert fit.label(patched, 12, 13, within=3) is True
    assert fit.label(patched, 13, 14, within=3) is None  # too late to count either way


def test_a_patch_is_caught_by_either_look_and_a_clean_look_is_false_by_either(fit):
    outcomes = [fit.ClipOutcome(0, 0, False, True, True, 0, 30),  # caught whatever the thresholds
                fit.ClipOutcome(0, 1, False, True, False, 0, 30),
                fit.ClipOutcome(0, 2, False, True, False, 0, 30),
                fit.ClipOutcome(0, 3, True, False, False, 1, 50)]  # clean, one alarm whatever the thresholds
    strong, weak = [2.0], [-1.0]  # first scores of 0.88 and 0.27 (their log-odds are the first cue)
    rows = [fit.Scored(0, 1, 12, strong, False, True), fit.Scored(0, 2, 12, weak, False, True),
            fit.Scored(0, 2, 5, strong, False, False), fit.Scored(0, 3, 20, weak, True, False),
            fit.Scored(0, 3, 30, strong, True, False)]
    p = np.array([0.1, 0.6, 0.95, 0.8, 0.3])  # the second looks' scores
    assert fit.first_probability(rows[0]) == pytest.approx(0.8808, abs=1e-4)
    # first look from 0.9, none from the second: only what is caught whatever the thresholds
    assert fit.outcome(rows, p, outcomes, 0.9, 1.0) == (1, 3, 1, 50)
    # first look from 0.8: clip 1 caught, and the clean strong blob is a false alarm
    assert fit.outcome(rows, p, outcomes, 0.8, 1.0) == (2, 3, 2, 50)
    # second look from 0.5 too: clip 2's weak blob is caught by it, the clean weak blob (0.8) alarms
    assert fit.outcome(rows, p, outcomes, 0.8, 0.5) == (3, 3, 3, 50)
    # a look before onset (clip 2, frame 5) is never a catch, and a patched clip's look never a false alarm
    assert fit.outcome(rows[2:3], p[2:3], outcomes[2:3], 0.5, 0.5) == (0, 1, 0, 0)


def test_choose_takes_the_most_caught_within_the_false_alarms_allowed(fit):
    table = {(0.8, 0.3): (98, 100, 30, 10_000), (0.8, 0.5): (96, 100, 5, 10_000),
             (0.8, 0.6): (96, 100, 4, 10_000), (0.9, 0.7): (94, 100, 1, 10_000)}
    assert fit.choose(table, max_false=0.5) == (0.8, 0.6)  # 0.3 allows too many; 0.5 and 0.6 tie: the higher
    assert fit.choose(table, max_false=0.1) == (0.9, 0.7)


def test_seeds_are_numbers_and_inclusive_ranges_and_a_typo_is_named():
    detection = bench_module("monitor_detection")
    assert detection.seeds("0-2,20, 22-23,") == [0, 1, 2, 20, 22, 23]
    assert detection.seeds("") == []
    with pytest.raises(SystemExit, match="'2x'"):
        detection.seeds("0,2x")


def look_rows(seed: int, patch_first: float, rng, looks: int = 12) -> list:
    """A patch's looks and clean looks of one seed: the patch's first score is `patch_first` (log-odds), the clean
    ones' 2.0; only `flip_kept` tells them apart (kept by a patch, not by the clean blobs)."""
    from monitor.second_look import SECOND_LOOK_CUES

    def cues(first_logit: float, flip_kept: float) -> list[float]:
        values = dict.fromkeys(SECOND_LOOK_CUES, 0.0) | {"first_logit": first_logit, "flip_kept": flip_kept}
        values["blob_change"] = float(rng.random())  # noise the trees must not need
        return [values[c] for c in SECOND_LOOK_CUES]

    fit = bench_module("fit_second_look")
    return ([fit.Scored(seed, 0, 11 + k, cues(patch_first, 0.9 + 0.1 * rng.random()), False, True)
             for k in range(looks)] +
            [fit.Scored(seed, 1, 20 + k, cues(2.0, 0.1 * rng.random()), True, False) for k in range(looks)])


def test_the_fit_learns_from_every_look_and_counts_only_those_the_detector_takes(fit):
    rng = np.random.default_rng(0)
    # seeds 0 and 1: a patch's looks and clean looks each; the patch's first score is 0.5 on seed 1, below 0.8
    rows, outcomes = [], []
    for seed, patch_first in ((0, 2.0), (1, 0.0)):
        outcomes += [fit.ClipOutcome(seed, 0, False, True, False, 0, 30),
                     fit.ClipOutcome(seed, 1, True, False, False, 0, 50)]
        rows += look_rows(seed, patch_first, rng)
    settings = {"trees": 5, "depth": 2, "rate": 0.5, "min_leaf": 1}
    counted_low = fit.leave_one_seed_out(rows, outcomes, look_from=0.2, **settings)
    counted_high = fit.leave_one_seed_out(rows, outcomes, look_from=0.8, **settings)
    assert counted_low[(1.0, 0.5)] == (2, 2, 0, 100)  # `flip_kept` tells them apart: both patches caught
    assert counted_high[(1.0, 0.5)] == (1, 2, 0, 100)  # seed 1's patch is never looked at from 0.8


def test_the_fitted_trees_score_as_scikit_learn_does(fit):
    """The scorer's trees are scikit-learn's, written out: the same probabilities on looks it never saw."""
    from sklearn.ensemble import GradientBoostingClassifier

    rng = np.random.default_rng(1)
    rows = look_rows(0, 0.5, rng, looks=40) + look_rows(1, 1.5, rng, looks=40)
    for row in rows:  # overlapping classes, so the trees have work to do
        row.cues = [c + float(rng.normal(0, 0.3)) for c in row.cues]
    scorer, importances = fit.fit(rows, trees=8, depth=2, rate=0.3, min_leaf=5)
    x = np.array([r.cues for r in rows])
    y = np.array([r.patch for r in rows])
    reference = GradientBoostingClassifier(n_estimators=8, max_depth=2, learning_rate=0.3, min_samples_leaf=5,
                                           random_state=0)
    reference.fit(x, y, sample_weight=np.where(y, 0.5 / y.mean(), 0.5 / (1 - y.mean())))
    fresh = look_rows(2, 1.0, rng, looks=20)
    expected = reference.predict_proba(np.array([r.cues for r in fresh]))[:, 1]
    assert fit.probabilities(fresh, scorer) == pytest.approx(expected, abs=2e-3)
    assert len(scorer.trees) == 8 and max(importances, key=importances.get) == "flip_kept"
