"""Starting and stopping the service on a local cluster of its own says nothing misleading: no "Connecting to
existing Serve app" on a fresh start (serve.run joining the Serve instance serve.start has just made), and no
"graceful_shutdown failed ... infinite retries" at the stop (Ray reporting the Serve controller's intended death)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

SERVICE = textwrap.dedent("""
    import sys
    import requests
    import torch
    from export import export_onnx
    from segmenters.data import dataset_classes
    from segmenters.models import build_model
    from segmenters.spec import ModelSpec
    from segmenters.twin import load_twin, save_twin
    from serving.cluster import free_port, start_local
    from serving.config import ServeConfig

    folder = sys.argv[1]
    spec = ModelSpec(arch="unet", classes=dataset_classes("shapes"), input_size=(64, 64), dataset="shapes")
    torch.manual_seed(0)
    save_twin(f"{folder}/twin.pt", build_model("unet", spec.num_classes), spec)
    export_onnx(load_twin(f"{folder}/twin.pt"), f"{folder}/model.onnx")
    config = ServeConfig(models=[{"name": "shapes", "path": f"{folder}/model.onnx", "threads": 1}], port=free_port())
    service = start_local(config, metrics_port=free_port())
    print("READY", requests.get(f"{service.url}/v2/models/shapes/ready", timeout=30).status_code, flush=True)
    service.stop()
    print("STOPPED", flush=True)
""")


def test_a_fresh_start_and_a_stop_log_no_misleading_serve_lines(tmp_path):
    done = subprocess.run([sys.executable, "-c", SERVICE, str(tmp_path)], capture_output=True, text=True, timeout=600)
    said = done.stdout + done.stderr
    assert done.returncode == 0 and "READY 200" in said and "STOPPED" in said, said[-3000:]
    assert "Connecting to existing Serve app" not in said
    assert "graceful_shutdown" not in said and "infinite retries" not in said
