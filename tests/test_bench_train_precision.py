"""bench/train_precision.py times every arch in fp32 and in bf16 and reports bf16's time over fp32's, with whether
the device has bf16 hardware."""

from __future__ import annotations

import json

import pytest

from conftest import bench_module


def test_every_arch_is_timed_in_both_precisions(tmp_path, capsys):
    bench = bench_module("train_precision")
    assert bench.main(["--archs", "unet", "--crop", "32x32", "--batch", "2", "--steps", "1", "--warmup", "0",
                       "--repeats", "2", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "train_precision.json").read_text())
    unet = report["results"]["unet"]
    assert [len(unet["runs"][amp]) for amp in ("off", "bf16")] == [2, 2]
    assert all(seconds > 0 for values in unet["runs"].values() for seconds in values)
    assert unet["bf16_over_fp32"] == pytest.approx(unet["s_per_step"]["bf16"] / unet["s_per_step"]["off"])
    assert isinstance(report["native_bf16"], bool)
    assert "unet" in capsys.readouterr().out
