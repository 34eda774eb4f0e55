"""Campaigns as Ray jobs, for real: `ray job submit` against a local Ray cluster started on 127.0.0.1 by the
test, a worker killed mid-trial, and a job killed and resubmitted. Every trial must end stored exactly once."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from audit.campaign import expand, load_campaign
from audit.store import TrialStore
from serving.cluster import start_head

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def campaign_file(folder: Path, twin: Path, steps: int = 4, count: int = 2, sizes=(4, 8)) -> Path:
    path = folder / "campaign.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "models": [str(twin)],
        "images": {"dataset": "shapes", "split": "val", "count": count},
        "targets": [{"kind": "switch"}], "patch_sizes": list(sizes), "seeds": [0],
        "attack": {"steps": steps, "eot_samples": 1}, "eot_eval_draws": 2,
    }))
    return path


def stored_ids(run: Path) -> list[str]:
    with sqlite3.connect(run / "trials.sqlite") as db:
        try:
            return [row[0] for row in db.execute("SELECT id FROM trials")]
        except sqlite3.OperationalError:  # the driver created the file and has not written its schema yet
            return []


def test_campaign_through_ray_job_submit(shapes_twin, tmp_path):
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    config = campaign_file(job_dir, shapes_twin)
    run = tmp_path / "run"
    # a head of this test's own (every port free, token auth), stopped alone: never `ray stop`, which would end
    # every Ray cluster on the machine
    head = start_head(num_cpus=2)
    try:
        submit = ["audit", "campaign", "campaign.yaml", "--out", str(run), "--quiet"]
        first = head.submit(submit, working_dir=job_dir)
        assert first.returncode == 0 and "succeeded" in first.stdout + first.stderr, first.stdout[-3000:]
        trials = expand(load_campaign(config))
        assert sorted(stored_ids(run)) == sorted(t.id for t in trials)
        for trial in trials:
            folder = run / "trials" / trial.id
            assert {"patch.npy", "patch.png", "before.png", "after.png", "target.png"} <= {p.name for p in folder.iterdir()}
        # the VGatt audit of the stored trials, as a job on the same cluster; resubmitted, it repeats nothing
        audit_job = ["audit", "vgatt", str(run), "--quiet"]
        audited = head.submit(audit_job, working_dir=job_dir)
        assert audited.returncode == 0 and '"audited": 4' in audited.stdout, audited.stdout[-3000:]
        with TrialStore(run) as store:
            audits = store.audits("attribution")
        assert sorted(audits) == sorted(t.id for t in trials)
        for metrics in audits.values():
            assert metrics["target_class"] is None or 0 <= metrics["inside_share_attacked"] <= 1
        assert '"already_audited": 4' in head.submit(audit_job, working_dir=job_dir).stdout
        report = subprocess.run([str(BIN / "audit"), "report", str(run)], capture_output=True, text=True, timeout=300)
        assert report.returncode == 0, report.stderr[-2000:]
        page = (run / "report" / "index.html").read_text()
        assert page.count("<tr><td><code>") == len(trials) and (run / "report" / "by_patch_size.png").stat().st_size
        assert "Why the pixels flipped (VGatt)" in page and "4 trials audited" in page
        for trial in trials:
            assert f'src="../trials/{trial.id}/after.png"' in page
        again = head.submit(submit, working_dir=job_dir)
        assert again.returncode == 0 and '"already_stored": 4' in again.stdout and '"stored": 0' in again.stdout
        assert len(stored_ids(run)) == len(trials)
    finally:
        head.stop()


def test_a_killed_worker_loses_nothing(shapes_twin, tmp_path):
    from audit.runner import run_campaign

    config = campaign_file(tmp_path, shapes_twin, steps=60, count=2, sizes=(4, 8))
    trials = expand(load_campaign(config))
    killed, campaign_ended = [], threading.Event()

    def kill_one_trial_worker():
        import ray

        # no deadline of its own: on a loaded machine the workers may take minutes to import and start a trial
        while not campaign_ended.is_set() and not killed:
            if not ray.is_initialized():
                time.sleep(0.1)
                continue
            # this test's cluster only: trial workers are children of its raylet
            raylets = {p.process.pid for p in ray._private.worker._global_node.all_processes["raylet"]}
            for process in psutil.process_iter(["name", "cmdline", "ppid"]):
                title = " ".join(process.info["cmdline"] or []) + (process.info["name"] or "")
                if "_run_trial" in title and process.info["ppid"] in raylets:
                    time.sleep(0.5)  # mid-attack
                    process.kill()
                    killed.append(process.pid)
                    return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_one_trial_worker)
    killer.start()
    try:
        summary = run_campaign(config, tmp_path / "run", local_cpus=2, progress=False)
    finally:
        campaign_ended.set()
        killer.join()
    assert killed, "no trial worker was found to kill"
    assert summary["failed"] == 0 and summary["stored"] == len(trials)
    ids = stored_ids(tmp_path / "run")
    assert sorted(ids) == sorted(t.id for t in trials) and len(ids) == len(set(ids))


def test_a_killed_job_resubmitted_repeats_nothing(shapes_twin, tmp_path):
    config = campaign_file(tmp_path, shapes_twin, steps=30, count=3, sizes=(4, 8))
    trials = expand(load_campaign(config))
    run = tmp_path / "run"
    command = [str(BIN / "audit"), "campaign", str(config), "--out", str(run), "--local-cpus", "1", "--quiet"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    job = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not ((run / "trials.sqlite").exists() and len(stored_ids(run)) >= 2):
            assert job.poll() is None and time.monotonic() < deadline, "the job ended before it could be killed"
            time.sleep(0.2)
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the driver and the local cluster it started
        job.wait(timeout=60)
    with TrialStore(run) as store:
        before = {row["id"]: row["finished"] for row in store.rows()}
    assert 2 <= len(before) < len(trials)

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f'"already_stored": {len(before)}' in again.stdout
    with TrialStore(run) as store:
        rows = store.rows()
    assert sorted(r["id"] for r in rows) == sorted(t.id for t in trials)  # every trial, once
    assert all(r["finished"] == before[r["id"]] for r in rows if r["id"] in before)  # nothing redone


def stored_nodes(run: Path) -> dict[str, str]:
    if not (run / "trials.sqlite").exists():  # the job has not started its driver yet
        return {}
    with sqlite3.connect(run / "trials.sqlite") as db:
        try:
            return dict(db.execute("SELECT id, node FROM trials"))
        except sqlite3.OperationalError:  # schema not written yet
            return {}


def test_a_lost_node_loses_no_trial(shapes_twin, tmp_path):
    """A campaign over a head and a second node; the second node's raylet is killed while it runs a trial. Every
    trial ends stored exactly once (the lost one retried on the head) and the report names each trial's node."""
    from serving.cluster import start_node

    job_dir = tmp_path / "job"
    job_dir.mkdir()
    config = campaign_file(job_dir, shapes_twin, steps=40, count=3, sizes=(4, 8))
    trials = expand(load_campaign(config))
    run = tmp_path / "run"
    head = start_head(num_cpus=1, joinable=True)
    try:
        node = start_node(head, num_cpus=1)
        try:
            job: dict = {}
            submit = threading.Thread(target=lambda: job.update(done=head.submit(
                ["audit", "campaign", "campaign.yaml", "--out", str(run), "--quiet"], working_dir=job_dir)))
            submit.start()
            # no deadline of its own: the job's end (or its timeout) ends the wait
            while submit.is_alive() and not (any(node.node_id[:8] in (n or "") for n in stored_nodes(run).values())
                                             and node.runs("_run_trial")):
                time.sleep(0.2)
            assert submit.is_alive(), "the campaign ended before a trial ran on the second node"
            node.kill_raylet()
            submit.join()
        finally:
            node.stop()
        done = job["done"]
        assert done.returncode == 0 and "succeeded" in done.stdout + done.stderr, done.stdout[-3000:]
        assert '"failed": 0' in done.stdout, done.stdout[-3000:]
        nodes = stored_nodes(run)
        assert sorted(nodes) == sorted(t.id for t in trials)  # every trial, once (the id is the table's key)
        on_second = [t for t, n in nodes.items() if node.node_id[:8] in n]
        on_head = [t for t, n in nodes.items() if n.startswith("head ")]
        assert on_second and len(on_second) + len(on_head) == len(trials), nodes
        report = subprocess.run([str(BIN / "audit"), "report", str(run)], capture_output=True, text=True, timeout=300)
        assert report.returncode == 0, report.stderr[-2000:]
        page = (run / "report" / "index.html").read_text()
        assert "By node" in page and node.node_id[:8] in page
    finally:
        head.stop()
