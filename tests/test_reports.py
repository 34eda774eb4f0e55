"""Campaign reports people can read, on small real campaign runs (real trials of a shapes twin, stored in a real
trial store): targets in the twin's class names, no placeholder commands, strict JSON, sections only where
there is something to show, and `audit vgatt` refreshing the report by itself. Also the titled panels."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from audit.campaign import expand, load_campaign
from audit.cli import audit
from audit.report import describe_target, write_report
from audit.store import TrialStore
from audit.trial import execute_trial
from segmenters.visualize import save_panel

CAMPAIGN = {
    "name": "readable", "images": {"dataset": "shapes", "split": "val", "count": 3, "objects_per_image": 1},
    "targets": [{"kind": "switch", "from_classes": ["sphere"], "to_class": "cube"}, {"kind": "switch"}],
    "patch_sizes": [8], "seeds": [0], "attack": {"steps": 2, "eot_samples": 1}, "eot_eval_draws": 2,
    "device": "cpu",
}


def stored_run(folder, twin, **changes):
    """A campaign run folder whose every trial ran (in this process) and is stored as the job's driver stores
    it: the campaign as written and as validated, then each trial's files and row."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "campaign.yaml"
    path.write_text(yaml.safe_dump({**CAMPAIGN, "models": [str(twin)], **changes}))
    config = load_campaign(path)
    run = folder / "run"
    with TrialStore(run) as store:
        store.save_campaign(path.read_text(), config.model_dump_json())
        for trial in expand(config):
            result = execute_trial(config.model_dump_json(), trial, torch.device("cpu"))
            store.record(trial.as_dict(), result["metrics"], result["artefacts"], result["replay"], result["worker"],
                         result["seconds"])
    return run


@pytest.fixture(scope="module")
def campaign_run(tmp_path_factory, shapes_twin):
    return stored_run(tmp_path_factory.mktemp("campaign"), shapes_twin)


def test_targets_are_named_by_the_twins_classes_and_no_placeholder_is_left(campaign_run):
    page = write_report(campaign_run).read_text()
    with TrialStore(campaign_run) as store:
        rows = store.rows()
    # what the trials stored is the indices' form; the page shows the twin's class names instead
    assert any(re.fullmatch(r"class \d+ -> \d+", r["metrics"]["description"]) for r in rows)
    assert not re.search(r"class \d+ -&gt; \d+|-&gt; class \d+|class \d+ disappears", page)
    assert "sphere -&gt; cube" in page  # the switch that named its classes
    assert page.count("<tr><td><code>") == len(rows)
    # the hint names this run, not a placeholder
    assert "RUN<" not in page and "vgatt RUN" not in page
    assert f"<code>audit vgatt {campaign_run}</code>" in page


def test_sections_with_nothing_to_show_are_left_out(campaign_run):
    page = write_report(campaign_run).read_text()
    assert "held-out" not in page  # no physical views in this campaign: no such header or column
    assert "VGatt: clean" not in page  # not audited yet: no attribution pictures to name
    assert "<h2>Failures</h2>" not in page  # none recorded
    assert "physical_success_mean" not in page  # a figure no trial measured gets no column
    assert "Trials (best first): before | after | target | patch</h2>" in page
    assert ">nan<" not in page


def test_summary_json_is_strict_json(campaign_run):
    write_report(campaign_run)

    def refuse(constant):
        raise ValueError(f"summary.json holds {constant}, which is not JSON")

    summary = json.loads((campaign_run / "report" / "summary.json").read_text(), parse_constant=refuse)
    (row,) = summary["by_size"]
    assert row["trials"] == summary["trials"] > 0
    assert row["physical_success_mean"] is None  # not measured: null, where NaN was written before


def test_held_out_views_are_shown_when_the_campaign_has_them(tmp_path, shapes_twin):
    run = stored_run(tmp_path / "physical", shapes_twin, physical_views=1,
                     images={"dataset": "shapes", "split": "val", "count": 1, "objects_per_image": 1},
                     targets=[{"kind": "switch"}])
    (trial,) = (run / "trials").iterdir()
    page = write_report(run).read_text()
    assert (trial / "physical.png").is_file()
    assert "| held-out views with the patch as a decal</h2>" in page
    assert f'src="../trials/{trial.name}/physical.png"' in page


def test_a_target_is_described_as_stored_where_the_twin_is_not_at_hand(tmp_path):
    row = {"model": str(tmp_path / "gone.pt"), "target": "switch", "source_class": 2, "to_class": 1,
           "metrics": {"description": "class 2 -> 1"}}
    assert describe_target(row) == "class 2 -> 1"


@pytest.mark.slow
def test_audit_vgatt_refreshes_the_report(campaign_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(campaign_run, run)
    before = write_report(run).read_text()
    assert "No VGatt audit yet" in before and "Why the pixels flipped (VGatt)" not in before
    result = CliRunner().invoke(audit, ["vgatt", str(run), "--device", "cpu", "--local-cpus", "1", "--quiet"])
    assert result.exit_code == 0, result.output[-3000:]
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["report"] == str(run / "report" / "index.html")
    with TrialStore(run) as store:
        trials = store.count()
    page = (run / "report" / "index.html").read_text()  # no `audit report` in between
    assert "Why the pixels flipped (VGatt)" in page and f"{trials} trials audited" in page
    assert "No VGatt audit yet" not in page


def test_every_panel_has_its_title(tmp_path):
    tiles = [np.zeros((32, 48, 3), np.uint8), np.full((32, 48, 3), 255, np.uint8)]
    save_panel(tmp_path / "panel.png", tiles, titles=["image", "labels"])
    with Image.open(tmp_path / "panel.png") as panel:
        assert panel.height > 256  # small tiles are enlarged, with room for their titles
    with pytest.raises(ValueError, match="one title per tile: 2 tiles, 1 titles"):
        save_panel(tmp_path / "other.png", tiles, titles=["image"])
