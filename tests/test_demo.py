"""`patchwatch demo --quick`, as a user runs it: every step for real (training, export, Ray head, Serve, two
`ray job submit`s, the monitor over HTTP, the reports)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from patchwatch.demo import FRAMES

pytestmark = pytest.mark.slow
#: each of the two demo runs may take this long before it counts as hung (a loaded 2-core machine is slow, not hung)
RUN_TIMEOUT_S = 1500


@pytest.mark.timeout(2 * RUN_TIMEOUT_S + 300)  # the suite's 900 s would cut the two runs short on a loaded machine
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
    # a second run reuses the twin and the engine
    again = subprocess.run([str(Path(sys.executable).parent / "patchwatch"), "demo", "--quick", "--out", str(out)],
                           capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    facts = json.loads((out / "demo.json").read_text())
    assert "reused" in facts["twin"] and "reused" in facts["engine"]
