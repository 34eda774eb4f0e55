"""The monitor's live page (`monitor.web`) for streams whose names are free text: file paths, rtsp:// URLs, spaces,
`?`, `#`, `%`, unicode, and a name written to break out of the page. A real monitor over an untrained shapes
U-Net (PyTorch engine), served by the real uvicorn server on 127.0.0.1 and read over real HTTP; the page's own
JavaScript is run by headless Chromium where it is installed."""

from __future__ import annotations

import json
import re
import subprocess
import time

import cv2
import numpy as np
import pytest
import requests

from monitor.flips import FlipAlarm
from monitor.pipeline import Monitor
from monitor.streams import ReplaySource, Stream
from monitor.web import MonitorServer, MonitorView

INJECTION = '</script><script>document.title="pwned"</script><img src=x onerror="document.title=\'pwned\'">'
NAMES = ["runs/x/drive.mp4", "rtsp://cam-7/stream", "front camera ? #2 100% · café 東京", ".", INJECTION]
FRAMES = 3


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A monitor that ran a short clip on every stream of `NAMES`, and its page on a real server."""
    import torch

    from export import TorchEngine
    from segmenters.data import dataset_classes
    from segmenters.models import build_model
    from segmenters.spec import ModelSpec
    from segmenters.twin import Twin

    torch.manual_seed(0)
    spec = ModelSpec(arch="unet", classes=dataset_classes("shapes"), input_size=(32, 32), dataset="shapes")
    monitor = Monitor(TorchEngine(Twin(build_model("unet", spec.num_classes).eval(), spec), device="cpu"))
    for i, name in enumerate(NAMES):
        clip = [np.full((32, 32, 3), 30 * i + frame, np.uint8) for frame in range(FRAMES)]
        monitor.add(Stream(ReplaySource(clip), name=name, policy="block"))
    server = MonitorServer(MonitorView(monitor)).start()
    try:
        monitor.run(duration=120)
        yield monitor, server
    finally:
        server.stop()


def page_streams(page: str) -> list[dict]:
    """The streams the page's script knows, read back from the page as JavaScript reads them (JSON)."""
    return json.loads(re.search(r"const streams = (.*);\n", page).group(1))


def test_every_stream_is_served_whatever_its_name(served):
    monitor, server = served
    assert all(stats["processed"] == FRAMES for stats in monitor.summary()["streams"].values())
    page = requests.get(server.url, timeout=10).text
    assert page_streams(page) == [{"id": i, "name": name} for i, name in enumerate(NAMES)]
    listed = requests.get(server.url + "api/streams", timeout=10).json()
    assert {name: stats["id"] for name, stats in listed.items()} == {name: i for i, name in enumerate(NAMES)}
    for i, name in enumerate(NAMES):
        frame = requests.get(f"{server.url}streams/{i}/frame.jpg", timeout=10)
        assert frame.status_code == 200 and frame.headers["content-type"] == "image/jpeg", name
        assert cv2.imdecode(np.frombuffer(frame.content, np.uint8), cv2.IMREAD_COLOR).shape[1] == 320
    missing = requests.get(f"{server.url}streams/{len(NAMES)}/frame.jpg", timeout=10)
    assert missing.status_code == 404 and f"{len(NAMES)} streams are monitored" in missing.json()["error"]
    assert requests.get(server.url + "streams/rtsp:%2F%2Fcam-7%2Fstream/frame.jpg", timeout=10).status_code == 404


def test_a_name_is_text_on_the_page_never_markup(served):
    _, server = served
    page = requests.get(server.url, timeout=10).text
    assert INJECTION not in page and "</script><script>" not in page.split("<script>", 1)[1].rsplit("</script>", 1)[0]
    assert page.count("<script>") == 1 and page.count("<img ") == len(NAMES)
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", page)
    assert captions == [name.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
                        .replace('"', "&quot;").replace("'", "&#x27;") for name in NAMES]


def test_the_page_script_runs_and_marks_the_alarmed_stream_in_chromium(served, tmp_path):
    """Chromium runs the page's JavaScript: every stream's image points at its id's frame, the alarm of the
    stream named "rtsp://cam-7/stream" marks that stream's figure and no other, and the injection stays text."""
    from test_monitor import CHROMIUM_FLAGS, chromium

    browser = chromium()
    monitor, server = served
    stream = "rtsp://cam-7/stream"
    monitor.alarms.append(FlipAlarm(stream=stream, frame=2, time=time.time(), onset_frame=2, bbox=(1, 2, 3, 4),
                                    pixels=4, from_class=1, to_class=2, from_name="a", to_name="b",
                                    transitions={"a->b": 4}, image_change=0.0, area_z={}))
    try:
        dom = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}",
                              "--virtual-time-budget=3000", "--dump-dom", server.url],
                             capture_output=True, text=True, timeout=90).stdout
    finally:
        monitor.alarms.pop()
    assert "<title>patchwatch monitor</title>" in dom, dom[:500]
    marked = re.findall(r'<figure id="fig-(\d+)" class="alarm">', dom)
    assert marked == [str(NAMES.index(stream))], dom[-3000:]
    for i in range(len(NAMES)):
        assert re.search(rf'<img id="img-{i}" alt="[^"]*" src="streams/{i}/frame\.jpg\?t=\d+">', dom), dom[-3000:]
    assert f"<td>{stream}</td><td>2</td>" in dom and '<img src="x"' not in dom
