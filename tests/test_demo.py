"""`patchwatch demo --quick`, as a user runs it: every step for real (training, export, Ray head, Serve, two
`ray job submit`s, the monitor over HTTP, the reports)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from monitor.flips import FlipAlarm
from monitor.streams import StreamFrame
from patchwatch.demo import ALARM_PICTURE_SIZE, ALARM_STRIP_FRAMES, FRAMES, AlarmStrips, export_engine, train_twin

#: the demo run may take this long before it counts as hung (a loaded 2-core machine is slow, not hung)
RUN_TIMEOUT_S = 1500


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S + 300)  # the suite's 900 s would cut the run short on a loaded machine
def test_quick_demo_runs_the_whole_story(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run([str(Path(sys.executable).parent / "patchwatch"), "demo", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    page = Path(done.stdout.strip().splitlines()[-1])
    assert page == (out / "index.html").resolve() and page.exists()
    facts = json.loads((out / "demo.json").read_text())
    assert [s["step"][:2] for s in facts["steps"]] == ["1.", "2.", "3.", "4.", "5.", "6.", "7."]
    assert facts["engine"]["parity"] == "PASS"
    streams = facts["monitor"]["streams"]
    # the cameras keep only their newest frame ("latest"): how many the monitor took depends on the machine's
    # speed, but every frame read was either processed or counted as dropped
    assert facts["monitor"]["engine_errors"] == 0
    for name in ("camera-1 (patch appears)", "camera-2 (clean)"):
        counts = streams[name]
        assert counts["read"] == FRAMES and counts["processed"] >= 1, counts
        assert counts["processed"] + counts["dropped"] == counts["read"], counts
    assert streams["camera-3 (broken)"]["bad_frames"] == 1
    events = [json.loads(line) for line in (out / "monitor" / "events.jsonl").read_text().splitlines()]
    assert {"connected", "ended", "bad_frame"} <= {e["kind"] for e in events if e["type"] == "stream"}
    assert len([e for e in events if e["type"] == "flip"]) == sum(s["alarms"] for s in streams.values())
    report = (out / "campaign" / "report" / "index.html").read_text()
    assert "Why the pixels flipped (VGatt)" in report and "3 trials audited" in report
    html = page.read_text()
    assert "campaign report" in html and "camera-1 (patch appears)" in html
    # a second run reuses the twin and the engine (the steps that would otherwise train and export again; the rest
    # of the story, Ray and the jobs, is the first run's)
    assert "reused" in train_twin(out, True, torch.device("cpu"))
    assert "reused" in export_engine(out, torch.device("cpu"))


def test_alarm_strips_save_the_frames_up_to_each_alarm_in_order(tmp_path):
    palette = np.array([[0, 0, 0], [255, 0, 0]], np.uint8)
    strips = AlarmStrips(tmp_path, palette)
    labels = np.zeros((8, 12), np.int64)
    alarm = FlipAlarm(stream="cam:1", frame=6, time=0.0, onset_frame=5, bbox=(0, 0, 4, 4), pixels=16, from_class=0,
                      to_class=1, from_name="a", to_name="b", transitions={"a->b": 16}, image_change=0.1, area_z={})
    for index in range(7):
        rgb = np.full((8, 12, 3), index * 10, np.uint8)
        strips(StreamFrame("cam:1", index, rgb, captured=0.0), labels, [alarm] if index in (2, 6) else [])
        strips(StreamFrame("cam/2", index, rgb, captured=0.0), labels, [])
    first, second = strips.pictures
    assert [p["frame"] for p in first["strip"]] == [0, 1, 2]  # what there was before the alarm
    assert [p["frame"] for p in second["strip"]] == list(range(7 - ALARM_STRIP_FRAMES, 7))
    assert second["alarm"]["frame"] == 6 and second["alarm"]["type"] == "flip"
    for picture in second["strip"]:
        image = Image.open(tmp_path / Path(picture["image"]).name)
        assert image.size == ALARM_PICTURE_SIZE and image.getpixel((0, 0))[0] == picture["frame"] * 10
        assert (tmp_path / Path(picture["labels"]).name).exists() and picture["image"].startswith("monitor/cam_1_")
