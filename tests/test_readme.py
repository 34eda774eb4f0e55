"""The README is executed: each ```bash block runs, in order, as a new user pasting it would (tests/readme_blocks.py
says how a block is marked to run with a smaller budget, in the background, or not at all, and why).

The walkthrough runs in a scratch checkout: the repository's tracked files copied into a temporary folder, `.venv`
linked there, with `../shared` beside it, and HOME pointing at a temporary folder, so what the README writes
lands there. A README command that fails fails this test with the command's output."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from readme_blocks import ReadmeBlock, read_blocks, split_background

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
BLOCKS = read_blocks(REPO / "README.md")
SERVER_READY_TIMEOUT_S = 300
# a stop past this is hung, not slow: Serve's shutdown took over 60 s on this 2-core machine with a CPU hog beside it
SERVER_STOP_TIMEOUT_S = 300
OUTPUT_TAIL_CHARS = 6000
# Set to run the README exactly as written, ignoring its `replace` directives (the full budgets: ~25 minutes).
LITERAL_VARIABLE = "PATCHWATCH_README_LITERAL"
# Set to a folder to keep the walkthrough there (and reuse it: rerun single blocks with -k while fixing the README).
WORKDIR_VARIABLE = "PATCHWATCH_README_WORKDIR"
# Set to a file to append every block's command, output, exit status and time to it.
TRANSCRIPT_VARIABLE = "PATCHWATCH_README_TRANSCRIPT"
pytestmark = pytest.mark.slow


def _copy_tracked_files(checkout: Path) -> None:
    """The repository's tracked files as they are in the working tree (copies, not links: a campaign file's
    `../runs` must mean the scratch checkout's runs, as it would in a clone)."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in filter(None, listed.split("\0")):
        source, target = REPO / name, checkout / name
        if source.is_file() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def _git(checkout: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=readme-test", "-c", "user.email=readme-test@localhost", *args],
                          cwd=checkout, capture_output=True, text=True, check=True).stdout


def _commit_scratch(checkout: Path) -> None:
    """The scratch checkout as a git work tree with everything committed, so that afterwards `git status` shows
    what the walkthrough wrote that .gitignore does not cover (the checkout's `.venv` is a link here, not a folder)."""
    if (checkout / ".git").exists():
        return
    _git(checkout, "init", "-q")
    (checkout / ".git" / "info" / "exclude").write_text(".venv\n")
    _git(checkout, "add", "-A")
    _git(checkout, "commit", "-q", "-m", "the checkout before the README's commands")


def _git_status(checkout: Path) -> set[str]:
    return set(_git(checkout, "status", "--porcelain", "--untracked-files=all").splitlines())


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    """The scratch checkout the README's blocks run in, its environment, and the cleanups the blocks register."""
    if not (REPO / ".venv" / "bin" / "patchwatch").exists():
        pytest.skip("the README's commands use .venv/bin/patchwatch: run `make setup` first")
    if not (SHARED / "data" / "camvid").is_dir():
        pytest.skip(f"the README's walkthrough reads CamVid from {SHARED / 'data'}; it is not there")
    root = Path(os.environ.get(WORKDIR_VARIABLE) or tmp_path_factory.mktemp("readme"))
    checkout, home = root / "main", root / "home"
    checkout.mkdir(parents=True, exist_ok=True)
    home.mkdir(exist_ok=True)
    _copy_tracked_files(checkout)
    if not (checkout / ".venv").is_symlink():
        (checkout / ".venv").symlink_to(REPO / ".venv")
    if not (root / "shared").is_symlink():
        (root / "shared").symlink_to(SHARED.resolve())
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "PATCHWATCH_"))}
    env.update(HOME=str(home), PYTHONUNBUFFERED="1")
    state = {"dir": checkout, "env": env, "cleanup": [], "failed": None,
             "transcript": Path(os.environ[TRANSCRIPT_VARIABLE]) if os.environ.get(TRANSCRIPT_VARIABLE) else None}
    _commit_scratch(checkout)
    yield state
    for command in reversed(state["cleanup"]):
        subprocess.run(["bash", "-c", command], cwd=checkout, env=env, capture_output=True, timeout=120)
    left = _git_status(checkout)
    assert not left, f"the README's commands left files git would commit (not in .gitignore): {sorted(left)}"


def _tail(text: str | bytes | None) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-OUTPUT_TAIL_CHARS:]


def _record(state: dict, block: ReadmeBlock, script: str, done: subprocess.CompletedProcess, seconds: float) -> None:
    if state["transcript"] is None:
        return
    with state["transcript"].open("a") as transcript:
        transcript.write(f"\n===== README block {block.name} (line {block.line}): exit {done.returncode}, "
                         f"{seconds:.0f} s\n$ {script}\n{done.stdout}{done.stderr}")


def _run(script: str, block: ReadmeBlock, state: dict) -> None:
    env = {**state["env"], **block.env}
    started = time.monotonic()
    try:
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=state["dir"], env=env,
                              capture_output=True, text=True, timeout=block.timeout_s)
        _record(state, block, script, done, time.monotonic() - started)
    except subprocess.TimeoutExpired as timeout:
        pytest.fail(f"README block {block.name} (line {block.line}) ran past {block.timeout_s:.0f} s\n"
                    f"{_tail(timeout.stdout)}\n{_tail(timeout.stderr)}")
    if done.returncode != 0:
        pytest.fail(f"README block {block.name} (line {block.line}) exited {done.returncode}:\n{script}\n"
                    f"--- stdout\n{_tail(done.stdout)}\n--- stderr\n{_tail(done.stderr)}")


def _wait_until_answers(url: str, server: subprocess.Popen, block: ReadmeBlock, log: Path) -> None:
    deadline = time.monotonic() + SERVER_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"README block {block.name}: the server exited {server.returncode} before {url} answered:\n"
                        f"{_tail(log.read_bytes())}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1)
    pytest.fail(f"README block {block.name}: {url} did not answer within {SERVER_READY_TIMEOUT_S} s")


def _as_from_a_terminal() -> None:
    """A server started from a terminal takes Ctrl-C; one started by a suite that runs as a background job (`make
    test &`) would inherit SIGINT ignored and never stop on the Ctrl-C this test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _run_with_server(script: str, block: ReadmeBlock, state: dict) -> None:
    first, rest = split_background(script)
    # the server's output goes to a file: a pipe nobody reads until the end can fill and block the server
    log = state["dir"].parent / f"server-{block.name}.log"
    with log.open("wb") as output:
        server = subprocess.Popen(["bash", "-c", f"exec {first}"], cwd=state["dir"], env={**state["env"], **block.env},
                                  stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                                  preexec_fn=_as_from_a_terminal)
    try:
        _wait_until_answers(block.background_url, server, block, log)
        _run(rest, block, state)
    finally:
        os.killpg(server.pid, signal.SIGINT)  # Ctrl-C, as the README says the server stops
        try:
            server.wait(SERVER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
            pytest.fail(f"README block {block.name}: the server did not stop on Ctrl-C within "
                        f"{SERVER_STOP_TIMEOUT_S} s:\n{_tail(log.read_bytes())}")


@pytest.mark.parametrize("block", BLOCKS, ids=[block.name for block in BLOCKS])
def test_readme_block(block: ReadmeBlock, walkthrough):
    if block.skip:
        pytest.skip(f"README line {block.line}: {block.skip}")
    if walkthrough["failed"]:
        pytest.skip(f"an earlier README block failed ({walkthrough['failed']}); the walkthrough builds on it")
    walkthrough["cleanup"].extend(block.cleanup)
    walkthrough["failed"] = block.name
    script = block.script if os.environ.get(LITERAL_VARIABLE) else block.runnable_script()
    if block.background_url:
        _run_with_server(script, block, walkthrough)
    else:
        _run(script, block, walkthrough)
    walkthrough["failed"] = None
