"""`patchwatch monitor` from the command line: its usage errors, and a real run of a synthetic camera and a stored
campaign trial's scene (`trial:RUN:TRIAL@ONSET`, read through `audit.store`) through a real ONNX engine of an
untrained shapes U-Net, with `--confirm vgatt --twin` loading the real twin; a real video file played at its own
rate or frame by frame (`--every-frame`); and `--keep-page` keeping the page of a finished run up in a real
`patchwatch monitor` process until it is signalled."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading

import cv2
import numpy as np
import pytest
import requests
from click.testing import CliRunner

from audit.campaign import CampaignConfig
from audit.store import TrialStore
from monitor.streams import DEFAULT_FILE_FPS, POLICIES
from patchwatch.monitor_cli import monitor

#: the line `--keep-page` prints once the run has ended and the page stays up
KEEP_PAGE_MARKER = "run ended; the live page stays up at "


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


def write_video(path, count: int = 6, fps: float = 20.0, size: int = 64):
    """A real MJPG video of `count` frames at `fps` (a size the U-Net takes)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (size, size))
    for i in range(count):
        writer.write(np.full((size, size, 3), 30 * i, np.uint8))
    writer.release()
    return path


def summary_of(result) -> dict:
    return json.loads(result.stdout[result.stdout.index("{"):])


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


def test_help_says_how_files_are_paced_and_how_to_keep_the_page():
    text = invoke("--help").output
    assert f"{DEFAULT_FILE_FPS:g} for images" in text and "monitor.streams.DEFAULT_FILE_FPS" in text
    assert "--every-frame" in text and "--keep-page" in text and "its own frame rate" in text


def test_contradicting_options_and_a_missing_video_are_refused(tmp_path):
    video = str(write_video(tmp_path / "drive.avi"))
    cases = {
        (video, "--every-frame", "--fps", "10"): "--every-frame reads files as fast as the engine goes",
        (video, "--keep-page", "--no-page"): "cannot go with --no-page",
        (video, "--fps", "0"): "Invalid value for '--fps'",
        (str(tmp_path / "missing.mp4"), "--no-page"): f"no video file at {tmp_path / 'missing.mp4'}",
    }
    for args, message in cases.items():
        result = invoke(*args, "--events", str(tmp_path / "events.jsonl"))
        assert result.exit_code == 2 and message in result.output, (args, result.output)


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


@pytest.mark.slow  # the ONNX export of the twin
def test_a_video_plays_at_its_own_rate_or_every_frame_reaches_the_engine(tmp_path, shapes_twin_and_engine):
    _, engine = shapes_twin_and_engine
    video = str(write_video(tmp_path / "drive.avi", count=6, fps=20.0))
    played = invoke(video, "--engine", str(engine), "--no-page", "--events", str(tmp_path / "played.jsonl"))
    assert played.exit_code == 0, played.output
    assert f"{video}: played at 20 frames/s" in played.stderr
    stream = summary_of(played)["streams"][video]
    assert stream["read"] == 6 and stream["processed"] + stream["dropped"] == 6 and stream["ended"], stream

    every = invoke(video, "--engine", str(engine), "--every-frame", "--no-page", "--events",
                   str(tmp_path / "every.jsonl"))
    assert every.exit_code == 0, every.output
    assert "played at" not in every.stderr
    stream = summary_of(every)["streams"][video]
    assert stream["processed"] == stream["read"] == 6 and stream["dropped"] == 0 and stream["ended"], stream


def lines_of(pipe) -> queue.Queue:
    """The lines a child writes to `pipe`, as they come, read on a thread (None when the pipe closed)."""
    lines: queue.Queue = queue.Queue()

    def read():
        for line in pipe:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


def wait_for_line(lines: queue.Queue, start: str, seen: list, timeout: float = 180.0) -> str:
    while True:
        line = lines.get(timeout=timeout)
        assert line is not None, f"the monitor ended before printing {start!r}: {''.join(seen)}"
        seen.append(line)
        if line.startswith(start):
            return line


@pytest.mark.slow  # the ONNX export of the twin, and a real `patchwatch monitor` process
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_keep_page_serves_the_finished_run_until_signalled(tmp_path, shapes_twin_and_engine, stop):
    _, engine = shapes_twin_and_engine
    (tmp_path / "runs" / "x").mkdir(parents=True)
    video = str(write_video(tmp_path / "runs" / "x" / "drive.avi", count=4))  # a name with "/" in it
    command = [sys.executable, "-m", "patchwatch.cli", "monitor", video, "--engine", str(engine), "--every-frame",
               "--keep-page", "--page-port", "0", "--events", str(tmp_path / "events.jsonl")]
    # Ctrl-C reaches Python as KeyboardInterrupt only where SIGINT is not inherited ignored (a background job)
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen: list[str] = []
    try:
        lines = lines_of(child.stderr)
        url = wait_for_line(lines, "live page: ", seen).split("live page: ", 1)[1].strip()
        assert wait_for_line(lines, KEEP_PAGE_MARKER, seen).strip().startswith(KEEP_PAGE_MARKER + url)
        page = requests.get(url, timeout=10)
        assert page.status_code == 200 and video in page.text
        streams = requests.get(url + "api/streams", timeout=10).json()
        assert streams[video]["ended"] and streams[video]["processed"] == 4, streams
        assert requests.get(url + "streams/0/frame.jpg", timeout=10).headers["content-type"] == "image/jpeg"
        assert child.poll() is None  # still serving: nothing asked it to stop
        child.send_signal(stop)
        out, _ = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, "".join(seen)
    assert json.loads(out[out.index("{"):])["streams"][video]["processed"] == 4
    with pytest.raises(requests.ConnectionError):
        requests.get(url, timeout=10)


@pytest.mark.slow  # the ONNX export of the twin
def test_counterfactuals_can_run_on_a_local_copy_of_the_engine(tmp_path, shapes_twin_and_engine):
    _, engine = shapes_twin_and_engine
    result = invoke("synthetic:3", "--engine", str(engine), "--counterfactual-engine", str(engine), "--frames", "4",
                    "--policy", "block", "--no-page", "--events", str(tmp_path / "events.jsonl"))
    assert result.exit_code == 0, result.output
    assert summary_of(result)["streams"]["synthetic:3"]["processed"] == 4
    # another model's copy is refused, naming the option: its labels would "revert" anywhere
    import torch

    from export import export_onnx
    from segmenters.models import build_model
    from segmenters.twin import load_twin, save_twin

    twin = load_twin(shapes_twin_and_engine[0])
    torch.manual_seed(1)
    save_twin(tmp_path / "other.pt", build_model("unet", twin.spec.num_classes), twin.spec.with_updates(
        checkpoint_digest=None))
    export_onnx(load_twin(tmp_path / "other.pt"), tmp_path / "other.onnx")
    refused = invoke("synthetic:3", "--engine", str(engine), "--counterfactual-engine", str(tmp_path / "other.onnx"),
                     "--frames", "2", "--no-page", "--events", str(tmp_path / "refused.jsonl"))
    assert refused.exit_code == 2 and "--counterfactual-engine" in refused.output and "checkpoint" in refused.output
