"""`patchwatch cluster up|env|status|down` against a real Ray head on this machine, and what `ray job submit
--working-dir .` uploads, built by Ray's own packaging function from this repository's .gitignore and .rayignore."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
PATCHWATCH = [str(Path(sys.executable).parent / "patchwatch")]  # as a user runs it (not -m: the cwd is no import root)
#: over Ray's upload limit (GCS_STORAGE_MAX_SIZE, 100 MiB): uploaded, it would fail the job with a 413
BIG_BYTES = 150 * 1024 * 1024
#: what following the README leaves in a checkout, none of which may leave the machine with a job
LEFT_BEHIND = ["runs/campaigns/x/trials.sqlite", "keys/signing.key", "keys/signing.pub", "elsewhere/deploy.key",
               "lraspp.tar.gz", "engines/lraspp.onnx", "engines/lraspp.plan", "twins/mine.pt", "selfie.onnx",
               "run/summary.json", "cache/mediapipe-0.10.21.whl", "data/camvid/val/0001.png",
               "bench/results/camvid/semeda/best.pt", ".venv/bin/python", ".git/config"]
#: source and configuration a job needs (named like what is left behind, but elsewhere in the tree; no package
#: of this project's, which a job given the folder would import from it)
SHIPPED = ["campaign.yaml", "tool/cli.py", "tool/data/__init__.py", "tool/run/x.py", ".ci/run", "bench/campaigns/a.yaml",
           "docs/figures/a.png", "README.md"]


def checkout_like(folder: Path) -> Path:
    """A folder holding this repository's ignore files, what a job needs, and what must stay behind (one file
    under runs/ over Ray's upload limit, sparse so it costs no disk)."""
    folder.mkdir()
    for name in (".gitignore", ".rayignore"):
        shutil.copy(ROOT / name, folder / name)
    for name in LEFT_BEHIND + SHIPPED:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(f"{name}\n")
    os.truncate(folder / LEFT_BEHIND[0], BIG_BYTES)
    return folder


def ray_upload(folder: Path, zip_path: Path, include_gitignore: bool) -> list[str]:
    """The names in the package `ray job submit --working-dir FOLDER` uploads (include_gitignore False is what
    RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 makes of it)."""
    from ray._private.runtime_env.packaging import create_package

    create_package(str(folder), zip_path, include_gitignore=include_gitignore)
    with zipfile.ZipFile(zip_path) as package:
        return package.namelist()


@pytest.mark.parametrize("include_gitignore", [True, False], ids=["gitignore+rayignore", "rayignore-only"])
def test_the_working_dir_upload_leaves_runs_keys_bundles_and_checkpoints_behind(tmp_path, include_gitignore):
    folder = checkout_like(tmp_path / "checkout")
    names = ray_upload(folder, tmp_path / "package.zip", include_gitignore)
    assert not set(LEFT_BEHIND) & set(names), f"uploaded with the job: {sorted(set(LEFT_BEHIND) & set(names))}"
    assert set(SHIPPED) <= set(names)


def test_rayignore_repeats_every_gitignore_line():
    """Ray reads .rayignore whatever RAY_RUNTIME_ENV_IGNORE_GITIGNORE says; it must hold what .gitignore holds."""
    def patterns(name):
        return {line.strip() for line in (ROOT / name).read_text().splitlines()
                if line.strip() and not line.startswith("#")}

    assert patterns(".gitignore") <= patterns(".rayignore"), patterns(".gitignore") - patterns(".rayignore")


def test_this_repositorys_upload_is_source_only(tmp_path):
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    names = ray_upload(ROOT, tmp_path / "package.zip", include_gitignore=True)
    assert "pyproject.toml" in names and "audit/cli.py" in names
    for kept in (".venv/", ".git/", "runs/", "bench/results/", "keys/", "engines/", "twins/"):
        assert not [name for name in names if name.startswith(kept)], kept
    assert (tmp_path / "package.zip").stat().st_size < GCS_STORAGE_MAX_SIZE


def cli(*args, cwd: Path, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([*PATCHWATCH, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def printed_submit(output: str, working_dir: bool) -> tuple[dict, str]:
    """(environment, ray command) from the `ray job submit` line `cluster up` printed."""
    marker = "job submit --working-dir . --" if working_dir else "job submit -- audit"
    words = shlex.split(next(line for line in output.splitlines() if marker in line))
    ray = words.index("job") - 1
    return dict(word.split("=", 1) for word in words[:ray]), words[ray]


def stop_recorded(state: Path) -> None:
    """Whatever a failed test left of the head it started, stopped (never `ray stop`)."""
    from serving.cluster import HeadRecordError, recorded_head

    try:
        head, _ = recorded_head(state)
    except HeadRecordError:
        return
    head.stop()


def probe_job(ray: str, env: dict, cwd: Path, working_dir: bool) -> subprocess.CompletedProcess:
    """A job that records where it ran, which `audit` its PATH gives, whether `audit --help` runs, and what files
    it was given, in runs/probe-*.json: relative to where it runs."""
    code = ("import json, os, shutil, subprocess; "
            "files = sorted(os.path.relpath(os.path.join(r, f)) for r, _, fs in os.walk('.') for f in fs); "
            "help = subprocess.run(['audit', '--help'], capture_output=True, text=True); "
            "print(json.dumps({'cwd': os.getcwd(), 'audit': shutil.which('audit'), 'help': help.returncode, "
            "'files': files}))")
    command = [ray, "job", "submit", *(["--working-dir", "."] if working_dir else []), "--", "python", "-c", code]
    return subprocess.run(command, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)


def job_report(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0 and "succeeded" in done.stdout + done.stderr, (done.stdout + done.stderr)[-3000:]
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith('{"cwd"')))


@pytest.mark.slow
def test_cluster_up_submit_status_down(tmp_path):
    checkout = checkout_like(tmp_path / "checkout")
    state = checkout / "runs" / "cluster"
    bin_dir = str(Path(sys.executable).parent)
    try:
        up = cli("cluster", "up", "--num-cpus", "1", cwd=checkout)
        assert up.returncode == 0 and up.stdout.startswith("up"), up.stdout + up.stderr
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        for name in ("head.json", "auth_token"):
            assert stat.S_IMODE((state / name).stat().st_mode) == 0o600
        token = (state / "auth_token").read_text()
        assert token not in up.stdout  # the lines name the token's file, not the token

        # the printed line, pasted: the job runs in the checkout, finds this environment's commands, and what it
        # writes to a relative path lands in the checkout
        env, ray = printed_submit(up.stdout, working_dir=False)
        assert env["RAY_AUTH_TOKEN_PATH"] == str((state / "auth_token").resolve()) and "RAY_ADDRESS" not in env
        ran = job_report(probe_job(ray, env, checkout, working_dir=False))
        assert ran["cwd"] == str(checkout) and ran["audit"] == f"{bin_dir}/audit" and ran["help"] == 0
        # --working-dir .: a copy on the head, without the key and without the file over the upload limit
        env, ray = printed_submit(up.stdout, working_dir=True)
        shipped = job_report(probe_job(ray, env, checkout, working_dir=True))
        assert shipped["cwd"] != str(checkout) and shipped["help"] == 0
        assert set(SHIPPED) <= set(shipped["files"]) and not set(LEFT_BEHIND) & set(shipped["files"])

        status = cli("cluster", "status", cwd=checkout)
        assert status.returncode == 0 and status.stdout.startswith("up"), status.stdout + status.stderr
        assert "GCS" in status.stdout and "dashboard" in status.stdout
        exported = cli("cluster", "env", cwd=checkout)
        assert exported.returncode == 0 and exported.stdout.startswith("export RAY_API_SERVER_ADDRESS=http://127.0.0.1:")

        record = json.loads((state / "head.json").read_text())
        starter = psutil.Process(record["pid"])
        family = [starter, *starter.children(recursive=True)]
        assert any("gcs_server" in " ".join(proc.cmdline()) for proc in family)  # a real head, with its GCS
        down = cli("cluster", "down", cwd=checkout)
        assert down.returncode == 0, down.stdout + down.stderr
        left = [proc.pid for proc in family if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE]
        assert left == [] and not (state / "head.json").exists() and not (state / "auth_token").exists()
        after = cli("cluster", "status", cwd=checkout)
        assert after.returncode == 1 and after.stdout.startswith("down")
    finally:
        stop_recorded(state)


def test_status_and_down_leave_a_process_that_reuses_the_recorded_pid_alone(tmp_path):
    """A record whose pid now belongs to another process (here: this test's) is stale: nothing is signalled."""
    from serving.cluster import HeadRecord

    state = tmp_path / "cluster"
    state.mkdir()
    (state / "auth_token").write_text("token")
    (state / "head.json").write_text(HeadRecord(
        pid=os.getpid(), create_time=psutil.Process().create_time() - 1000, gcs_address="127.0.0.1:1",
        dashboard_url="http://127.0.0.1:1", ports={}, cwd=str(tmp_path), bin=str(tmp_path)).model_dump_json())
    status = cli("cluster", "status", "--state-dir", str(state), cwd=tmp_path)
    assert status.returncode == 1 and f"(pid {os.getpid()}) has ended" in status.stdout
    down = cli("cluster", "down", "--state-dir", str(state), cwd=tmp_path)
    assert down.returncode == 0 and "nothing to stop" in down.stdout
    assert not (state / "head.json").exists()


def test_status_and_env_without_a_head_name_the_record(tmp_path):
    status = cli("cluster", "status", cwd=tmp_path)
    assert status.returncode == 1 and str(Path("runs/cluster/head.json")) in status.stdout
    exported = cli("cluster", "env", cwd=tmp_path)
    assert exported.returncode == 1 and "patchwatch cluster up" in exported.stderr and exported.stdout == ""
