"""`patchwatch serve` as a user runs it: a subprocess that starts its own local Ray cluster, prints its URLs,
enforces the API key, and stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import requests

from serving.client import OipClient, OipError
from serving.cluster import free_port

PATCHWATCH = [sys.executable, "-m", "patchwatch.cli"]


def test_serve_refuses_an_open_port_without_a_key(tmp_path):
    engine = tmp_path / "model.onnx"
    engine.write_bytes(b"not started: the check comes first")
    done = subprocess.run([*PATCHWATCH, "serve", str(engine), "--host", "0.0.0.0"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    assert "not loopback" in done.stderr and "api_key_env" in done.stderr
    missing = subprocess.run([*PATCHWATCH, "serve", str(tmp_path / "absent.onnx")], capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 2 and "no engine file" in missing.stderr
    unset = subprocess.run([*PATCHWATCH, "serve", str(engine), "--api-key-env", "PATCHWATCH_TEST_UNSET"],
                           capture_output=True, text=True, timeout=120, env={k: v for k, v in os.environ.items()
                                                                             if k != "PATCHWATCH_TEST_UNSET"})
    assert unset.returncode == 1 and "unset or empty" in unset.stderr


@pytest.mark.slow
@pytest.mark.data
def test_serve_command_with_an_api_key(camvid_unet_engines, tmp_path):
    port, metrics_port = free_port(), free_port()
    key = "s3cret-" + os.urandom(8).hex()
    env = {**os.environ, "PATCHWATCH_TEST_KEY": key}
    log = open(tmp_path / "serve.err", "w")
    process = subprocess.Popen(
        [*PATCHWATCH, "serve", f"camvid={camvid_unet_engines['1']}", "--port", str(port),
         "--metrics-port", str(metrics_port), "--api-key-env", "PATCHWATCH_TEST_KEY", "--threads", "1"],
        stdout=subprocess.PIPE, stderr=log, text=True, env=env,
        # as a script's background job (`patchwatch serve ... &`) starts it: SIGINT ignored, so SIGTERM stops it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, (tmp_path / "serve.err").read_text()[-3000:]
            try:
                if requests.get(f"{url}/v2/health/ready", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "patchwatch serve never became ready"
            time.sleep(1)
        while "ready; SIGTERM stops the service (it ignores Ctrl-C" not in (tmp_path / "serve.err").read_text():
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.5)

        assert requests.get(f"{url}/v2/health/live").status_code == 200  # probes need no key
        bare = requests.get(f"{url}/v2")
        assert bare.status_code == 401 and bare.headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer" in bare.json()["error"]
        wrong = requests.get(f"{url}/v2/models/camvid", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "not valid" in wrong.json()["error"]
        with pytest.raises(OipError) as info:
            OipClient(url).infer("camvid", {"frames": np.zeros((1, 32, 32, 3), np.uint8)})
        assert info.value.status == 401

        client = OipClient(url, api_key=key)
        assert client.server_metadata()["name"] == "patchwatch"
        out = client.infer("camvid", {"frames": np.zeros((1, 64, 96, 3), np.uint8)}, {"labels": True})
        assert out["labels"].shape == (1, 64, 96)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            stdout, _ = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        log.close()
    assert process.returncode == 0, (tmp_path / "serve.err").read_text()[-3000:]
    printed = json.loads(stdout[stdout.index("{"): stdout.rindex("}") + 1])
    assert printed["serving"] == url and printed["auth"] is True
    assert printed["urls"]["camvid infer"] == f"{url}/v2/models/camvid/infer"
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/v2/health/live", timeout=5)
