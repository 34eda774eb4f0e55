"""`patchwatch monitor` from the command line: its usage errors, and a real run of a synthetic camera and a stored
campaign trial's scene (`trial:RUN:TRIAL@ONSET`, read through `audit.store`) through a real ONNX engine of an
untrained shapes U-Net, with `--confirm vgatt --twin` loading the real twin."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from audit.campaign import CampaignConfig
from audit.store import TrialStore
from monitor.streams import POLICIES
from patchwatch.monitor_cli import monitor


def campaign(dataset: str = "shapes") -> str:
    return CampaignConfig(name="cli", models=["twin.pt"], images={"dataset": dataset, "split": "val", "count": 1},
                          targets=[{"kind": "switch"}], patch_sizes=[6]).model_dump_json()


def stored_run(folder, dataset: str = "shapes"):
    """A run with one stored trial: a saturated 6 px patch on object 1 of val scene 0."""
    with TrialStore(folder) as store:
        store.save_campaign("name: cli\n", campaign(dataset))
        store.record({"id": "t1", "model": "twin.pt", "image_index": 0, "target": "switch", "object_id": 1,
                      "source_class": 1, "to_class": 2, "size": 6, "seed": 0}, {"success": 1.0},
                     {"patch.npy": np.random.default_rng(0).integers(0, 2, (3, 6, 6)).astype(np.float32)})
    return folder


@pytest.fixture(scope="module")
def shapes_twin_and_engine(tmp_path_factory):
    import torch

    from export import export_onnx
    from segmenters.data import dataset_classes
    from segmenters.models import build_model
    from segmenters.spec import ModelSpec
    from segmenters.twin import load_twin, save_twin

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("shapes_twin")
    spec = ModelSpec(arch="unet", classes=dataset_classes("shapes"), input_size=(128, 128), dataset="shapes")
    save_twin(folder / "twin.pt", build_model("unet", spec.num_classes), spec)
    export_onnx(load_twin(folder / "twin.pt"), folder / "twin.onnx")
    return folder / "twin.pt", folder / "twin.onnx"


def invoke(*args: str):
    return CliRunner().invoke(monitor, list(args))


def test_confirm_needs_its_twin_and_the_twin_needs_confirm(tmp_path):
    twin = tmp_path / "twin.pt"
    twin.write_bytes(b"not read: the usage is refused first")
    alone = invoke("synthetic:0", "--confirm", "vgatt", "--no-page")
    assert alone.exit_code == 2 and "--confirm vgatt needs --twin CHECKPOINT" in alone.output
    stray = invoke("synthetic:0", "--twin", str(twin), "--no-page")
    assert stray.exit_code == 2 and "give --confirm vgatt with it" in stray.output
    unknown = invoke("synthetic:0", "--confirm", "gradcam", "--twin", str(twin))
    assert unknown.exit_code == 2 and "Invalid value for '--confirm'" in unknown.output
    gone = invoke("synthetic:0", "--confirm-twin", str(twin))  # the old spelling is gone: one way to say it
    assert gone.exit_code == 2 and "No such option" in gone.output


def test_policy_choices_are_the_streams_policies():
    choice = next(p for p in monitor.params if p.name == "policy").type
    assert tuple(choice.choices) == POLICIES


def test_trial_sources_that_cannot_be_opened_are_named(tmp_path):
    run = stored_run(tmp_path / "run")
    cases = {
        f"trial:{run}": "trial:RUN_DIR:TRIAL_ID[@ONSET]",
        f"trial:{run}:t1@soon": "trial:RUN_DIR:TRIAL_ID[@ONSET]",
        f"trial:{run}:nope": f"no trial 'nope' in campaign run {run}",
        f"trial:{tmp_path / 'missing'}:t1": f"no campaign run at {tmp_path / 'missing'}",
        f"trial:{stored_run(tmp_path / 'camvid', 'camvid')}:t1": "only shapes scenes can be re-rendered",
        "synthetic:three": "synthetic source wants a scene number",
        str(tmp_path / "no-such-frames"): "no frames at",
    }
    for source, message in cases.items():
        result = invoke(source, "--no-page", "--events", str(tmp_path / "events.jsonl"))
        assert result.exit_code == 2 and message in result.output, (source, result.output)
    assert not (tmp_path / "missing").exists()


@pytest.mark.slow  # the ONNX export of the twin
def test_monitor_runs_a_camera_and_a_trial_scene_through_an_engine_with_confirmation(tmp_path,
                                                                                     shapes_twin_and_engine):
    twin, engine = shapes_twin_and_engine
    run = stored_run(tmp_path / "run")
    events = tmp_path / "events.jsonl"
    trial = f"trial:{run}:t1@2"
    result = invoke("synthetic:3", trial, "--engine", str(engine), "--frames", "4", "--policy", "block",
                    "--confirm", "vgatt", "--twin", str(twin), "--device", "cpu", "--no-page", "--events", str(events))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    for name in ("synthetic:3", trial):  # "block": every frame of a finite clip reaches the engine
        stream = summary["streams"][name]
        assert stream["processed"] == stream["read"] == 4 and stream["dropped"] == 0 and stream["ended"], stream
    logged = [json.loads(line) for line in events.read_text().splitlines()]
    assert {(e["stream"], e["kind"]) for e in logged if e["type"] == "stream"} >= {(trial, "connected"), (trial, "ended")}
