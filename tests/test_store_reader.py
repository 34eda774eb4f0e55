"""The read-only side of a campaign run (`audit.store.trial_scenes` / `trial_scene` / `trial_metrics`): what
others outside `audit/` read a run through. A tiny real run, written by the real `TrialStore`."""

from __future__ import annotations

import numpy as np
import pytest

from audit.campaign import CampaignConfig
from audit.store import TrialScene, TrialStore, trial_metrics, trial_scene, trial_scenes

CAMPAIGN = CampaignConfig(name="reader", models=["twin.pt"], images={"dataset": "shapes", "split": "val", "count": 3},
                          targets=[{"kind": "switch"}], patch_sizes=[4])


def trial_row(trial_id: str, image_index: int, object_id: int, to_class: int | None) -> dict:
    return {"id": trial_id, "model": "twin.pt", "image_index": image_index, "target": "switch", "object_id": object_id,
            "source_class": 2, "to_class": to_class, "size": 4, "seed": 0}


def patch_of(value: float) -> np.ndarray:
    return np.full((3, 4, 4), value, np.float32)


@pytest.fixture
def run(tmp_path):
    """Three trials recorded out of id order, with a NaN metric as real campaigns store them."""
    path = tmp_path / "run"
    with TrialStore(path) as store:
        store.save_campaign("name: reader\n", CAMPAIGN.model_dump_json())
        for trial_id, index, object_id, value in [("c3", 5, 2, 0.75), ("a1", 1, 1, 0.25), ("b2", 3, 3, 0.5)]:
            assert store.record(trial_row(trial_id, index, object_id, 1), {"success": value, "physical": float("nan")},
                                {"patch.npy": patch_of(value)})
    return path


def listing(path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def test_scenes_in_trial_id_order_with_their_patches(run):
    scenes = trial_scenes(run)
    assert [s.trial for s in scenes] == ["a1", "b2", "c3"]
    first = scenes[0]
    assert isinstance(first, TrialScene)
    assert (first.dataset, first.split, first.image_index, first.object_id) == ("shapes", "val", 1, 1)
    assert (first.source_class, first.to_class) == (2, 1)
    np.testing.assert_array_equal(first.patch, patch_of(0.25))
    assert [s.trial for s in trial_scenes(run, limit=2)] == ["a1", "b2"] and trial_scenes(run, limit=0) == []
    with pytest.raises(ValueError, match="limit"):
        trial_scenes(run, limit=-1)


def test_one_scene_and_a_missing_trial_names_trial_and_run(run):
    scene = trial_scene(run, "c3")
    assert (scene.image_index, scene.object_id) == (5, 2)
    np.testing.assert_array_equal(scene.patch, patch_of(0.75))
    with pytest.raises(ValueError, match=f"no trial 'zz' in campaign run {run}"):
        trial_scene(run, "zz")


def test_metrics_by_trial(run):
    metrics = trial_metrics(run)
    assert list(metrics) == ["a1", "b2", "c3"] and metrics["b2"]["success"] == 0.5
    assert np.isnan(metrics["a1"]["physical"])


def test_reading_creates_nothing_even_while_a_writer_holds_the_run(run):
    before = listing(run)
    trial_scenes(run)
    trial_scene(run, "a1")
    trial_metrics(run)
    assert listing(run) == before  # not even SQLite's -wal / -shm files
    with TrialStore(run) as writer:  # a campaign still running: its WAL is there, and what it adds is read
        writer.record(trial_row("d4", 7, 1, None), {"success": 0.0}, {"patch.npy": patch_of(0.0)})
        during = listing(run)
        assert trial_scene(run, "d4").to_class is None and len(trial_scenes(run)) == 4
        assert listing(run) == during


def test_a_missing_run_is_an_error_naming_it_and_is_not_created(tmp_path):
    missing = tmp_path / "nowhere" / "run"
    with pytest.raises(FileNotFoundError, match=f"no campaign run at {missing}"):
        trial_scenes(missing)
    with pytest.raises(FileNotFoundError, match="no campaign run"):
        trial_scene(missing, "a1")
    assert not (tmp_path / "nowhere").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a campaign run"):
        trial_metrics(tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []


def test_a_trial_without_its_patch_file_is_named(run):
    (run / "trials" / "b2" / "patch.npy").unlink()
    with pytest.raises(FileNotFoundError, match="trial b2 .* has no stored patch"):
        trial_scene(run, "b2")
