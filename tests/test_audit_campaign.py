"""Campaign files (validation, clear errors), their expansion into trials with stable ids, and the trial store
(exactly once, files before rows)."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from audit.campaign import CampaignError, expand, load_campaign
from audit.store import TrialStore
from segmenters.data import build_dataset

SHAPES_CAMPAIGN = {
    "name": "shapes-switch",
    "models": ["twin.pt"],
    "images": {"dataset": "shapes", "split": "val", "count": 3, "objects_per_image": 2},
    "targets": [{"kind": "switch"}, {"kind": "switch", "from_classes": ["sphere"], "to_class": "cube"}],
    "patch_sizes": [8, 4, 8],
    "seeds": [0, 1],
    "attack": {"steps": 5},
}


def write(tmp_path, data, name="campaign.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_campaign_expands_into_stable_trials(tmp_path):
    config = load_campaign(write(tmp_path, SHAPES_CAMPAIGN))
    assert config.patch_sizes == [4, 8] and config.models == [str((tmp_path / "twin.pt").resolve())]
    # model, engine and mask paths are relative to the campaign file
    with_engines = load_campaign(write(tmp_path, {
        **SHAPES_CAMPAIGN, "engines": {"twin.pt": ["e/twin.onnx"]},
        "targets": [{"kind": "mask", "masks": {0: "masks/0.png"}}]}, "engines.yaml"))
    assert with_engines.engines == {str((tmp_path / "twin.pt").resolve()): [str((tmp_path / "e/twin.onnx").resolve())]}
    assert with_engines.targets[0].masks == {0: str((tmp_path / "masks/0.png").resolve())}
    trials = expand(config)
    again = expand(load_campaign(write(tmp_path, SHAPES_CAMPAIGN, "copy.yaml")))
    assert [t.id for t in trials] == [t.id for t in again]  # deterministic ids
    assert len({t.id for t in trials}) == len(trials)  # and unique
    switch_any = [t for t in trials if t.target.from_classes is None]
    assert switch_any and all(t.to_class != t.source_class and t.to_class in (1, 2, 3) for t in switch_any)
    spheres = [t for t in trials if t.target.from_classes]
    assert all(t.source_class == 2 and t.to_class == 1 for t in spheres)
    assert {t.size for t in trials} == {4, 8} and {t.seed for t in trials} == {0, 1}
    # a different attack setting is a different trial
    changed = dict(SHAPES_CAMPAIGN, attack={"steps": 6})
    assert not {t.id for t in trials} & {t.id for t in expand(load_campaign(write(tmp_path, changed, "b.yaml")))}


def test_random_images_and_objects(tmp_path):
    """`sample_seed` draws `count` images at random (as seed 000 drew its 100 samples), reproducibly; with
    `object_order: random` the attacked object of each image is drawn too, not always the largest."""
    images = {"dataset": "shapes", "split": "val", "count": 6, "sample_seed": 3, "objects_per_image": 1}
    trials = expand(load_campaign(write(tmp_path, {**SHAPES_CAMPAIGN, "images": images, "seeds": [0],
                                                   "patch_sizes": [4], "targets": [{"kind": "switch"}]})))
    indices = sorted({t.image_index for t in trials})
    available = len(build_dataset("shapes", "val"))
    assert len(indices) == 6 and indices != list(range(6)) and max(indices) < available
    other = expand(load_campaign(write(tmp_path, {**SHAPES_CAMPAIGN, "images": {**images, "sample_seed": 4},
                                                  "seeds": [0], "patch_sizes": [4], "targets": [{"kind": "switch"}]},
                                       "other.yaml")))
    assert sorted({t.image_index for t in other}) != indices
    largest = {t.image_index: t.object_id for t in trials}
    shuffled = expand(load_campaign(write(tmp_path, {**SHAPES_CAMPAIGN, "images": {**images, "object_order": "random"},
                                                     "seeds": [0], "patch_sizes": [4],
                                                     "targets": [{"kind": "switch"}]}, "random.yaml")))
    assert {t.image_index for t in shuffled} == set(indices)
    assert any(t.object_id != largest[t.image_index] for t in shuffled)
    with pytest.raises(CampaignError, match="cannot draw 5000 random images"):
        expand(load_campaign(write(tmp_path, {**SHAPES_CAMPAIGN, "images": {**images, "count": 5000}}, "many.yaml")))


@pytest.mark.parametrize("change, message", [
    ({"images": {"dataset": "shapes", "indices": [1], "sample_seed": 0}}, "either 'indices' or 'sample_seed'"),
    ({"patch_sizes": [0, 4]}, "patch_sizes: Value error, patch sizes must be >= 1"),
    ({"targets": [{"kind": "switch", "to_class": "pyramid"}]}, "class 'pyramid' is not a shapes class nor a class of the models"),
    ({"targets": [{"kind": "mask"}]}, "needs 'masks'"),
    ({"targets": [{"kind": "disappear"}]}, "needs 'remove_class'"),
    ({"images": {"dataset": "kitti"}}, "images.dataset"),
    ({"attack": {"steps": 0}}, "attack.steps"),
    ({"models": []}, "models"),
    ({"colour": "red"}, "colour: Extra inputs are not permitted"),
    ({"name": "has space"}, "name: String should match pattern"),
    ({"engines": {"other.pt": ["x.onnx"]}}, "not in 'models'"),
])
def test_invalid_campaigns_say_what_is_wrong(tmp_path, change, message):
    with pytest.raises(CampaignError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        load_campaign(write(tmp_path, {**SHAPES_CAMPAIGN, **change}))
    assert str(tmp_path / "campaign.yaml") in str(info.value)


def test_unreadable_campaign_files(tmp_path):
    with pytest.raises(CampaignError, match="cannot read"):
        load_campaign(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed")
    with pytest.raises(CampaignError, match="not valid YAML"):
        load_campaign(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(CampaignError, match="is a mapping"):
        load_campaign(tmp_path / "list.yaml")
    big = write(tmp_path, {**SHAPES_CAMPAIGN, "images": {"dataset": "shapes", "indices": [10**7]}}, "far.yaml")
    with pytest.raises(CampaignError, match="beyond the"):
        expand(load_campaign(big))


def test_store_records_each_trial_exactly_once(tmp_path):
    trial = {"id": "t1", "model": "m.pt", "image_index": 3, "target": "switch", "object_id": 2, "source_class": 1,
             "to_class": 2, "size": 4, "seed": 0}
    with TrialStore(tmp_path / "run") as store:
        store.record_failure(trial, "LocalRayletDiedError: the raylet died")  # a first attempt that was lost
        assert [f["id"] for f in store.failures()] == ["t1"] and store.done_ids() == set()
        assert store.record(trial, {"success": 0.5}, {"patch.npy": np.ones((3, 4, 4), np.float32),
                                                      "note.txt": b"hi"})
        assert not store.record(trial, {"success": 0.9}, {})
        assert store.done_ids() == {"t1"} and store.count() == 1
        # the resubmission stored it: its failure is settled, not reported as outstanding, but kept in history
        assert store.failures() == [] and len(store.failures(outstanding=False)) == 1
    with TrialStore(tmp_path / "run") as reopened:  # survives the process
        (row,) = reopened.rows()
        assert row["metrics"] == {"success": 0.5} and row["size"] == 4
        assert np.load(reopened.artefact_dir("t1") / "patch.npy").shape == (3, 4, 4)
        assert (reopened.artefact_dir("t1") / "note.txt").read_bytes() == b"hi"


def test_rayjob_manifest_runs_a_valid_campaign(tmp_path):
    from pathlib import Path

    documents = list(yaml.safe_load_all((Path(__file__).parents[1] / "deploy/rayjob.yaml").read_text()))
    config_map = next(d for d in documents if d["kind"] == "ConfigMap")
    job = next(d for d in documents if d["kind"] == "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["entrypoint"].startswith("audit campaign /config/campaign.yaml")
    (tmp_path / "campaign.yaml").write_text(config_map["data"]["campaign.yaml"])
    config = load_campaign(tmp_path / "campaign.yaml")
    assert config.patch_sizes == [2, 5, 10, 20, 40]
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert workers["resources"]["limits"]["nvidia.com/gpu"] == 1


def _own_classes_twin(path):
    """A twin with its own two-class table (as an imported selfie segmenter has), not the dataset's."""
    import torch

    from segmenters.models import build_model
    from segmenters.spec import ClassInfo, ModelSpec
    from segmenters.twin import save_twin

    torch.manual_seed(0)
    model = build_model("unet", 2)
    with torch.no_grad():  # the last layer's bias makes "person" the prediction everywhere: something to remove
        last = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        last.bias.copy_(torch.tensor([-5.0, 5.0]))
    spec = ModelSpec(arch="unet", classes=[ClassInfo(name="background", color=(0, 0, 0)),
                                           ClassInfo(name="person", color=(192, 128, 128))],
                     input_size=(48, 64), dataset="selfies")
    save_twin(path, model, spec)
    return path


def test_a_folder_of_photos_and_a_model_with_its_own_classes(tmp_path):
    """Photos without ground truth: `disappear` resolves its class in the model's table, a trial runs on them; a
    `switch` (which needs ground truth) and a class the model lacks are refused by name."""
    from PIL import Image

    from audit.trial import execute_trial

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    twin = _own_classes_twin(tmp_path / "selfie.pt")
    campaign = {"name": "photos", "models": [str(twin)],
                "images": {"dataset": "folder", "root": str(folder), "count": 2, "size": [48, 64]},
                "targets": [{"kind": "disappear", "remove_class": "person"}], "patch_sizes": [8],
                "attack": {"steps": 2, "eot_samples": 1}, "eot_eval_draws": 2, "device": "cpu"}
    config = load_campaign(write(tmp_path, campaign))
    trials = expand(config)
    assert [(t.image_index, t.source_class) for t in trials] == [(0, 1), (1, 1)]  # "person" is the model's 1
    result = execute_trial(config.model_dump_json(), trials[0])
    assert result["metrics"]["target_pixels"] == 48 * 64 and "patch.png" in result["artefacts"]
    with pytest.raises(CampaignError, match="ground truth"):
        load_campaign(write(tmp_path, {**campaign, "targets": [{"kind": "switch"}]}, "switch.yaml"))
    with pytest.raises(CampaignError, match="'car' is not a folder class nor a class of the models"):
        load_campaign(write(tmp_path, {**campaign, "targets": [{"kind": "disappear", "remove_class": "car"}]},
                            "car.yaml"))
    with pytest.raises(CampaignError, match="needs 'root'"):
        load_campaign(write(tmp_path, {**campaign, "images": {"dataset": "folder"}}, "noroot.yaml"))
