"""bench/semeda_step.py times each loss setting in this tree and in a baseline revision's segmenters/, each in its
own process: the baseline really is that revision's code, and every setting gets a figure (or says why not)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import BENCH, bench_module

REPO = BENCH.parent


def test_the_baseline_tree_is_the_revisions_own_segmenters(tmp_path):
    tree = bench_module("semeda_step").baseline_tree("HEAD", tmp_path)
    committed = subprocess.run(["git", "-C", str(REPO), "show", "HEAD:segmenters/losses/semeda.py"], check=True,
                               capture_output=True, text=True).stdout
    assert (tree / "segmenters" / "losses" / "semeda.py").read_text() == committed


def test_every_setting_is_timed_in_both_trees(tmp_path):
    command = [sys.executable, str(BENCH / "semeda_step.py"), "--baseline", "HEAD", "--losses", "ppce",
               "semeda-4-2-0", "--crop", "32x32", "--batch", "2", "--steps", "1", "--warmup", "0",
               "--repeats", "1", "--compile", "off", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "semeda_step.json").read_text())["results"]
    for tree in ("tree", "baseline"):
        assert set(results[tree]) == {"ppce", "semeda-4-2-0"}
        assert all(figure["s_per_step"] > 0 for figure in results[tree].values())
    assert "semeda-4-2-0" in done.stdout and "this / baseline" in done.stdout
