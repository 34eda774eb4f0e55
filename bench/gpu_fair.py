"""Spend a lent GPU on issue 18's CamVid plans: bench/camvid_semeda.py --plan fair and bench/camvid_archs.py.

On this project's 2-core CPU machines the unfinished runs of the two plans take a day (DeepLabV3-ResNet-18 alone
~10 h, the ladder DenseNet ~5 h, each LR-ASPP SEMEDA run ~2 h); on one GPU each is minutes. Two subcommands:

    python bench/gpu_fair.py train --out DIR [--minutes 7] [--parallel 5] [BUDGET]    on the GPU machine
    python bench/gpu_fair.py land FOLDER [--runs DIR]                         here, on what came back

`train`, within --minutes of wall clock (BUDGET: options given to every trainer and report beside the plans' own,
e.g. a dry run's `--max-steps 4 --val-limit 2 --semeda-pretrain-batches 2` with `--records-from none`):
1. lists the unfinished runs of both plans; a run recorded in bench/records/camvid_runs is finished (the records
   are copied into the work folder, so that the best lambda is known once the sweep is);
2. trains up to --parallel of them at once, each its own process (`--only NAME --train-only`), the arch runs first
   (the longest), starting the next as a slot frees: SEMEDA's best lambda at the other seeds joins once the sweep
   is finished. The budget is the plans' own; no autocast (`--amp off`, as the CPU runs were trained; cuDNN's
   convolutions in TF32, PyTorch's default on CUDA), eager;
3. at the deadline interrupts what still trains (last.pt holds its last whole epoch);
4. evaluates and reports: both scripts with --report-only, which record every finished run, and camvid_archs
   times each arch on this GPU (Engine.segment, torch fp32 and fp16);
5. packs into --out: records.tar.xz (the new records), reports.tar.xz (both reports and every log), and the
   folders of unfinished runs (their last.pt, config, history, pieces) as partial.tar.NN pieces while they fit the
   device tool's return (8 files of at most 16 MiB, 64 MiB in all); the most advanced run goes first.

`land` untars records.tar.xz into bench/records/camvid_runs (a record already there is kept) and the partial runs
into --runs, where no more advanced folder of the same run is (the CPU runs then continue them with `--only`),
and puts the reports and logs under --reports (bench/results/gpu_fair). Then `git add bench/records` and commit.

On the device it runs through bench/gpu_carry.sh (prepare-fair here, stash and fair there), which carries the
packages the machine lacks and CamVid; see that script's header.
"""

from __future__ import annotations

import argparse
import filecmp
import io
import json
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python bench/gpu_fair.py`: make `bench.*` importable
    sys.path.insert(0, str(REPO))

from bench import camvid_archs, camvid_semeda  # noqa: E402
from bench.camvid_runs import FAIR_RECORDS, FAIR_RUNS, RECORD_FILES, RunFolders, read_history  # noqa: E402

#: the scripts whose plans are trained, in the order their runs are started (the arch runs are the longest)
SCRIPTS = ("camvid_archs.py", "camvid_semeda.py")
#: what a run's folder must hold to be continued elsewhere; and what goes with it where it exists (a run interrupted
#: in its first piece has logged no piece yet: its history's per-epoch seconds hold its time)
RESUME_FILES = ("last.pt", "config.yaml", "history.json")
RESUME_EXTRAS = ("pieces.jsonl",)
#: the device tool returns at most this many files, each at most PIECE_BYTES, together at most RETURN_BYTES
RETURN_FILES = 8
PIECE_BYTES = 15 * 2**20
RETURN_BYTES = 60 * 2**20
#: seconds between looks at the trainers; seconds an interrupted trainer gets to finish before it is killed
POLL_SECONDS = 5
INTERRUPT_GRACE = 30
#: lines of each report's log echoed to the command's output (what the device tool shows of it)
REPORT_TAIL_LINES = 40


# ------------------------------------------------------------------------------------------------ the plans
def budget_arguments(work: Path, args: argparse.Namespace) -> list[str]:
    """What every trainer and report of this run is given: the plans' budget is their default."""
    return ["--runs", str(work / "runs"), "--records", str(work / "records"), "--device", args.device,
            "--amp", "off", "--compile", "off", "--workers", str(args.workers), "--quiet", *args.budget]


def unfinished(common: list[str]) -> list[tuple[str, str]]:
    """(script, run name) of every run of both plans not finished, recorded or done, in SCRIPTS order."""
    plans = {"camvid_archs.py": camvid_archs.parse_args(common),
             "camvid_semeda.py": camvid_semeda.parse_args(["--plan", "fair", *common])}
    found: dict[str, str] = {}
    for script in SCRIPTS:
        args = plans[script]
        folders = RunFolders(args)
        plan = (camvid_archs.build_plan(args) if script == "camvid_archs.py"
                else camvid_semeda.build_plan(args, folders))
        for run in plan:
            if run.name not in found and folders.state(run) in ("new", "partial"):
                found[run.name] = script
    return [(script, name) for name, script in found.items()]


def launch(script: str, name: str, common: list[str], logs: Path) -> subprocess.Popen:
    extra = ["--plan", "fair"] if script == "camvid_semeda.py" else []
    log = (logs / f"{name}.log").open("w")
    command = [sys.executable, str(REPO / "bench" / script), *extra, *common, "--only", name, "--train-only"]
    print(f"{time.strftime('%H:%M:%S')} start {name}", flush=True)
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


def stop(running: dict[str, subprocess.Popen]) -> None:
    """Interrupt every trainer (KeyboardInterrupt: last.pt keeps its last whole epoch), kill the ones that linger."""
    for process in running.values():
        process.send_signal(signal.SIGINT)
    ends = time.monotonic() + INTERRUPT_GRACE
    for name, process in running.items():
        try:
            process.wait(timeout=max(1.0, ends - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        print(f"{time.strftime('%H:%M:%S')} interrupted {name} at the deadline", flush=True)


def train_all(common: list[str], deadline: float, parallel: int, logs: Path) -> dict[str, int | None]:
    """Train the unfinished runs, --parallel at a time, until none is left or the deadline; each run's exit code
    (None: interrupted at the deadline)."""
    running: dict[str, subprocess.Popen] = {}
    outcome: dict[str, int | None] = {}
    while time.monotonic() < deadline:
        for name, process in list(running.items()):
            if process.poll() is not None:
                outcome[name] = process.returncode
                print(f"{time.strftime('%H:%M:%S')} end {name}: exit {process.returncode}", flush=True)
                del running[name]
        queue = [(script, name) for script, name in unfinished(common) if name not in outcome and name not in running]
        while queue and len(running) < parallel:
            script, name = queue.pop(0)
            running[name] = launch(script, name, common, logs)
        if not running:
            break
        time.sleep(POLL_SECONDS)
    stop(running)
    outcome.update({name: None for name in running})
    return outcome


def report(common: list[str], work: Path, deadline: float, logs: Path, engines: str) -> None:
    """Both reports with --report-only: each finished run evaluated and recorded, each arch timed on the device."""
    commands = {"camvid_fair": [sys.executable, str(REPO / "bench" / "camvid_semeda.py"), "--plan", "fair", *common,
                                "--report-only", "--out", str(work / "reports" / "camvid_fair")],
                "camvid_archs": [sys.executable, str(REPO / "bench" / "camvid_archs.py"), *common, "--report-only",
                                 "--engines", engines, "--out", str(work / "reports" / "camvid_archs")]}
    for name, command in commands.items():
        with (logs / f"report_{name}.log").open("w") as log:
            try:
                code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                      timeout=max(10.0, deadline - time.monotonic())).returncode
            except subprocess.TimeoutExpired:
                code = "timed out"
        print(f"{time.strftime('%H:%M:%S')} report {name}: {code}", flush=True)
        print("\n".join((logs / f"report_{name}.log").read_text().splitlines()[-REPORT_TAIL_LINES:]), flush=True)


# ------------------------------------------------------------------------------------------------ packing
def new_records(records: Path, committed: Path) -> list[Path]:
    """Record folders under `records` that `committed` lacks or holds otherwise."""
    changed = []
    for folder in sorted(p for p in records.iterdir() if p.is_dir()):
        there = committed / folder.name
        same = there.is_dir() and all((there / f).is_file() and filecmp.cmp(folder / f, there / f, shallow=False)
                                      for f in RECORD_FILES)
        if not same:
            changed.append(folder)
    return changed


def tar_bytes(members: list[tuple[Path, str]], compression: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=f"w:{compression}" if compression else "w") as archive:
        for path, name in members:
            archive.add(path, arcname=name)
    return buffer.getvalue()


def partial_runs(runs: Path, records: Path) -> list[Path]:
    """Run folders that can be continued and have no record (unfinished), the most advanced first."""
    folders = [p for p in runs.iterdir() if p.is_dir() and all((p / f).is_file() for f in RESUME_FILES)
               and not (records / p.name).is_dir()] if runs.is_dir() else []
    return sorted(folders, key=lambda p: -last_epoch(p))


def last_epoch(folder: Path) -> int:
    history = read_history(folder)
    return history[-1]["epoch"] if history else 0


def resume_members(folder: Path) -> list[Path]:
    return [folder / f for f in RESUME_FILES] + [folder / f for f in RESUME_EXTRAS if (folder / f).is_file()]


def pack(work: Path, out: Path, logs: Path, committed: Path) -> None:
    """records.tar.xz, reports.tar.xz and partial.tar.NN under `out`, within the device tool's return limits."""
    out.mkdir(parents=True, exist_ok=True)
    records = new_records(work / "records", committed)
    (out / "records.tar.xz").write_bytes(tar_bytes([(p, p.name) for p in records], "xz"))
    reports = [(p, p.name) for p in (work / "reports").iterdir()] if (work / "reports").is_dir() else []
    (out / "reports.tar.xz").write_bytes(tar_bytes([*reports, (logs, "logs")], "xz"))
    print(f"records: {[p.name for p in records] or 'none new'}")
    room = RETURN_BYTES - sum(p.stat().st_size for p in out.iterdir())
    pieces_left = RETURN_FILES - len(list(out.iterdir()))
    chosen = []
    for folder in partial_runs(work / "runs", work / "records"):
        size = sum(path.stat().st_size for path in resume_members(folder))
        pieces = -(-size // PIECE_BYTES)
        if size <= room and pieces <= pieces_left:
            chosen.append(folder)
            room, pieces_left = room - size, pieces_left - pieces
        else:
            print(f"partial {folder.name}: {size / 2**20:.0f} MiB does not fit what is left to return; left behind")
    if chosen:
        blob = tar_bytes([(path, f"{folder.name}/{path.name}") for folder in chosen for path in resume_members(folder)],
                         "")
        for number, start in enumerate(range(0, len(blob), PIECE_BYTES)):
            (out / f"partial.tar.{number:02d}").write_bytes(blob[start:start + PIECE_BYTES])
        print(f"partial runs returned: {[p.name for p in chosen]}")


def train_command(args: argparse.Namespace) -> None:
    started = time.monotonic()
    deadline = started + 60 * args.minutes
    work, out = Path(args.work), Path(args.out)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if not (work / "records").is_dir():
        if args.records_from == "none":
            (work / "records").mkdir()
        else:
            shutil.copytree(args.records_from, work / "records")
    common = budget_arguments(work, args)
    todo = unfinished(common)
    print(f"unfinished: {[name for _, name in todo]}", flush=True)
    outcome = train_all(common, deadline - 60 * args.report_minutes, args.parallel, logs)
    (logs / "outcome.json").write_text(json.dumps(outcome, indent=2))
    report(common, work, deadline - 20, logs, args.engines)
    pack(work, out, logs, Path(args.records_from))
    print(f"done in {time.monotonic() - started:.0f} s; left: {[name for _, name in unfinished(common)]}")


# ------------------------------------------------------------------------------------------------ landing
def land_command(args: argparse.Namespace) -> None:
    back, runs, committed = Path(args.folder), Path(args.runs), Path(args.records)
    with tarfile.open(back / "records.tar.xz") as archive:
        names = sorted({Path(m.name).parts[0] for m in archive.getmembers()})
        fresh = [name for name in names if not (committed / name).is_dir()]
        archive.extractall(committed, members=[m for m in archive.getmembers() if Path(m.name).parts[0] in fresh],
                           filter="data")
    print(f"records added under {committed}: {fresh or 'none'} (kept as they were: {sorted(set(names) - set(fresh))})")
    with tarfile.open(back / "reports.tar.xz") as archive:
        archive.extractall(args.reports, filter="data")
    print(f"reports and logs under {args.reports}")
    pieces = sorted(back.glob("partial.tar.*"))
    if pieces:
        land_partials(b"".join(p.read_bytes() for p in pieces), runs)


def land_partials(blob: bytes, runs: Path) -> None:
    """Each returned partial run into `runs`, unless a folder there is as far on."""
    with tarfile.open(fileobj=io.BytesIO(blob)) as archive:
        incoming = incoming_folder(runs)
        archive.extractall(incoming, filter="data")
    for folder in sorted(p for p in incoming.iterdir() if p.is_dir()):
        here = runs / folder.name
        if here.is_dir() and last_epoch(here) >= last_epoch(folder):
            print(f"partial {folder.name}: epoch {last_epoch(folder)} returned, {last_epoch(here)} here: kept")
            continue
        shutil.rmtree(here, ignore_errors=True)
        shutil.move(str(folder), here)
        print(f"partial {folder.name}: epoch {last_epoch(here)} landed in {here}; continue it with --only "
              f"{folder.name}")
    shutil.rmtree(incoming)


def incoming_folder(runs: Path) -> Path:
    """An empty folder beside the run folders (the same file system: landing a run is a rename)."""
    runs.mkdir(parents=True, exist_ok=True)
    folder = runs / ".incoming"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    return folder


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train the unfinished runs here, within --minutes")
    train.add_argument("--out", required=True, help="what goes back: records.tar.xz, reports.tar.xz, partial.tar.NN")
    train.add_argument("--work", default="/tmp/pw-fair", help="run folders, records, reports and logs")
    train.add_argument("--minutes", type=float, default=7.0, help="wall clock for the whole command")
    train.add_argument("--report-minutes", type=float, default=2.5,
                       help="of --minutes, kept for the reports (each finished run evaluated, each arch timed) and "
                            "packing: training stops this long before the end")
    train.add_argument("--parallel", type=int, default=5, help="runs trained at once")
    train.add_argument("--workers", type=int, default=2, help="DataLoader workers per run")
    train.add_argument("--device", default="cuda")
    train.add_argument("--engines", default="torch,torch-fp16", help="camvid_archs' timed engines")
    train.add_argument("--records-from", default=str(REPO / FAIR_RECORDS),
                       help="the records that count as finished (copied into --work); 'none': no run is")
    land = commands.add_parser("land", help="take in what `train` returned")
    land.add_argument("folder", help="the folder holding records.tar.xz, reports.tar.xz and any partial.tar.NN")
    land.add_argument("--runs", default=FAIR_RUNS, help="the run folders the CPU plans continue")
    land.add_argument("--records", default=FAIR_RECORDS, help="the committed records")
    land.add_argument("--reports", default="bench/results/gpu_fair", help="where the reports and logs go")
    args, budget = parser.parse_known_args()
    if budget and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(budget)}")
    args.budget = budget  # anything else goes to every trainer and report (a dry run: --max-steps 2 --val-limit 2)
    return args


def main() -> None:
    args = parse_args()
    train_command(args) if args.command == "train" else land_command(args)


if __name__ == "__main__":
    main()
