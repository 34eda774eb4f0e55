"""bench/gpu_fair.py: what a lent GPU trains of issue 18's CamVid plans, and how its results come back (within the
device tool's return limits) and land here. The training itself is the plans' own (tests/test_bench_camvid_records
covers --train-only and --report-only); these tests cover the listing, the packing and the landing, on real files."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from conftest import BENCH, bench_module

gpu_fair = bench_module("gpu_fair")
camvid_runs = bench_module("camvid_runs")
COMMITTED = BENCH / "records" / "camvid_runs"


def run_folder(root: Path, name: str, epoch: int, weight_bytes: int) -> Path:
    """A run folder as training leaves it: weights, config, history up to `epoch`."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "last.pt").write_bytes(bytes(range(256)) * (weight_bytes // 256))
    shutil.copyfile(COMMITTED / "lraspp_mobilenetv3_ppce_s0" / "config.yaml", folder / "config.yaml")
    (folder / "history.json").write_text(json.dumps([{"epoch": e, "step": 45 * e} for e in range(1, epoch + 1)]))
    return folder


def test_unfinished_lists_each_run_without_a_record_once_arch_runs_first(tmp_path):
    common = ["--runs", str(tmp_path / "runs"), "--records", str(COMMITTED), "--device", "cpu"]
    archs, semeda = bench_module("camvid_archs"), bench_module("camvid_semeda")
    semeda_args = semeda.parse_args(["--plan", "fair", *common])
    plans = [archs.build_plan(archs.parse_args(common)),
             semeda.build_plan(semeda_args, camvid_runs.RunFolders(semeda_args))]
    expected = list(dict.fromkeys(run.name for plan in plans for run in plan
                                  if not (COMMITTED / run.name / "final_eval.json").is_file()))
    listed = gpu_fair.unfinished(common)
    assert [name for _, name in listed] == expected
    assert "lraspp_mobilenetv3_ppce_s0" not in expected  # in both plans, recorded: finished elsewhere
    scripts = [script for script, _ in listed]
    assert scripts == sorted(scripts)  # camvid_archs.py's runs (the longest) are started first


@pytest.fixture()
def returned(tmp_path) -> tuple[Path, Path]:
    """What `train` packs: a committed record copied unchanged, a new record, two partial runs of which one fits."""
    work, out = tmp_path / "work", tmp_path / "out"
    shutil.copytree(COMMITTED, work / "records")
    new = work / "records" / "lraspp_mobilenetv3_semeda_9-9-9_s0"
    shutil.copytree(COMMITTED / "lraspp_mobilenetv3_ppce_s0", new)
    run_folder(work / "runs", "small_partial", epoch=12, weight_bytes=3 * gpu_fair.PIECE_BYTES // 2)
    run_folder(work / "runs", "huge_partial", epoch=150, weight_bytes=gpu_fair.RETURN_BYTES)
    (work / "reports" / "camvid_fair").mkdir(parents=True)
    (work / "reports" / "camvid_fair" / "comparison.json").write_text("{}")
    (work / "logs").mkdir()
    (work / "logs" / "outcome.json").write_text("{}")
    gpu_fair.pack(work, out, work / "logs", COMMITTED)
    return work, out


def test_pack_returns_new_records_and_the_partial_runs_that_fit_the_return_limits(returned):
    _, out = returned
    files = sorted(path.name for path in out.iterdir())
    assert files == ["partial.tar.00", "partial.tar.01", "records.tar.xz", "reports.tar.xz"]
    assert len(files) <= gpu_fair.RETURN_FILES
    assert all(path.stat().st_size <= gpu_fair.PIECE_BYTES for path in out.glob("partial.tar.*"))
    assert sum(path.stat().st_size for path in out.iterdir()) <= gpu_fair.RETURN_BYTES


def land(back: Path, tmp: Path) -> argparse.Namespace:
    args = argparse.Namespace(folder=str(back), runs=str(tmp / "runs_here"), records=str(tmp / "records_here"),
                              reports=str(tmp / "reports_here"))
    gpu_fair.land_command(args)
    return args


def test_land_adds_new_records_and_partial_runs_keeping_what_is_here(returned, tmp_path):
    _, out = returned
    shutil.copytree(COMMITTED, tmp_path / "records_here")
    kept = tmp_path / "records_here" / "lraspp_mobilenetv3_ppce_s0" / "history.json"
    before = kept.read_bytes()
    land(out, tmp_path)
    new = tmp_path / "records_here" / "lraspp_mobilenetv3_semeda_9-9-9_s0"
    assert sorted(p.name for p in new.iterdir()) == sorted(camvid_runs.RECORD_FILES)
    assert kept.read_bytes() == before
    landed = tmp_path / "runs_here" / "small_partial"
    assert sorted(p.name for p in landed.iterdir()) == ["config.yaml", "history.json", "last.pt"]
    assert (landed / "last.pt").stat().st_size == 3 * gpu_fair.PIECE_BYTES // 2 // 256 * 256
    assert not (tmp_path / "runs_here" / "huge_partial").exists()
    assert (tmp_path / "reports_here" / "logs" / "outcome.json").is_file()
    assert not (tmp_path / "runs_here" / ".incoming").exists()


def test_land_keeps_a_run_here_that_is_further_on(returned, tmp_path):
    _, out = returned
    here = run_folder(tmp_path / "runs_here", "small_partial", epoch=40, weight_bytes=1024)
    land(out, tmp_path)
    assert gpu_fair.last_epoch(here) == 40 and (here / "last.pt").stat().st_size == 1024
