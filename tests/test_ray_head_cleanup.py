"""A Ray head started for a demo or a test goes away with whoever started it, even when that process is SIGKILLed
(a timed-out test, a killed `patchwatch demo`): nothing of it is left running on the machine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
#: how long the head's processes may take to stop after their starter died (a bound for a loaded machine)
STOP_BOUND_S = 180

STARTER = textwrap.dedent("""
    import time
    from serving.cluster import start_head
    head = start_head(num_cpus=1)
    print(head.process.pid, flush=True)
    time.sleep(3600)
""")


@pytest.mark.slow
def test_the_heads_processes_stop_when_its_starter_is_killed():
    starter = subprocess.Popen([sys.executable, "-c", STARTER], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        head_pid = int(starter.stdout.readline())
        head = psutil.Process(head_pid)
        family = [head] + head.children(recursive=True)
        assert any("gcs_server" in " ".join(p.cmdline()) for p in family)  # a real head, with its GCS
    finally:
        os.kill(starter.pid, signal.SIGKILL)
        starter.wait()
    deadline = time.monotonic() + STOP_BOUND_S
    while time.monotonic() < deadline and any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family):
        time.sleep(1)
    left = [(p.pid, p.name()) for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for pid, _ in left:  # do not leave them to the rest of the suite either way
        os.kill(pid, signal.SIGKILL)
    assert not left, f"still running {STOP_BOUND_S} s after the starter was killed: {left}"
