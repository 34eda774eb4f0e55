"""Seed 000's complexity bound: the formulas on cases counted by hand, the patch's reach through real layer
stacks, the empirical region count along lines, the zoo table, and the seed's own Table 1 computation against
its published cells."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from audit.bounds import (arbitrary_map_side, bounds_markdown, bounds_table, conv_bound_log10, dense_bound_log10,
                          gate_shapes, log10_binomial_sum, patch_reach, regions_along_lines, seed_bound_log10)
from audit.seed_table import (SEED_TABLE_1, FCN8s, RonnebergerUNet, fits_patch_extent, per_pixel_intervals,
                              seed_markdown, seed_table)

# Seed 000, Table 1 as published (largest s x s region for arbitrary 19-class maps): the reference, copied from
# the seed, not from our output
PUBLISHED_TABLE_1 = {"UNET": {2: 13, 5: 33, 10: 62, 20: 114}, "FCN8": {2: 11, 5: 30, 10: 60, 20: 118},
                     "column 3": {2: 13, 5: 31, 10: 51, 20: 85}, "column 4": {2: 21, 5: 51, 10: 99, 20: 194}}
# the published cells the seed mode reproduces; every other one must be listed, with its reason, in the report
REPRODUCED = {("UNET", 10), ("FCN8", 2), ("FCN8", 20), ("column 3", 2)}


@pytest.mark.parametrize("n, k", [(3, 2), (10, 3), (5, 5), (0, 0), (7, 12), (200, 17)])
def test_binomial_sums(n, k):
    exact = sum(math.comb(n, j) for j in range(min(n, k) + 1))
    assert log10_binomial_sum(n, k) == pytest.approx(math.log10(exact), rel=1e-12, abs=1e-12)


def test_bounds_on_cases_counted_by_hand():
    # three lines in general position cut the plane into 7 regions: one ReLU layer of 3 units on a 2-D input
    assert 10 ** dense_bound_log10(2, [3]) == pytest.approx(7)
    assert 10 ** conv_bound_log10(2, [3]) == pytest.approx(7)
    # 1-D input, two layers of 2 units: each layer at most triples the pieces: 3 x 3
    assert 10 ** dense_bound_log10(1, [2, 2]) == pytest.approx(9)
    # 2-D input, 3 then 1 units: 7 x (1 + 1); the dense bound's dimension stays min(2, 3) = 2
    assert 10 ** dense_bound_log10(2, [3, 1]) == pytest.approx(14)
    assert 10 ** conv_bound_log10(2, [3, 1]) == pytest.approx(14)
    # a narrow layer caps the dimension the dense bound carries forward: 2 units, then 3 units on (at most) 2 dims
    assert 10 ** dense_bound_log10(4, [2, 3]) == pytest.approx(4 * 7)
    assert 10 ** conv_bound_log10(4, [2, 3]) == pytest.approx(4 * 8)
    # 19 classes, B = 19^9 maps: a 3x3 region at most; one map fewer and it is 2x2 (8 px)
    assert arbitrary_map_side(9 * math.log10(19), 19) == 3
    assert arbitrary_map_side(8.99 * math.log10(19), 19) == 2


def test_the_one_layer_count_is_reached_by_a_real_arrangement():
    """Units x, y, x + y - 1 on the plane: enumerate activation patterns on a grid; exactly the bound's 7."""
    layer = nn.Linear(2, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        layer.bias.copy_(torch.tensor([0.0, 0.0, -1.0]))
    axis = torch.linspace(-3, 3, 241)
    grid = torch.cartesian_prod(axis, axis)
    patterns = {tuple(row) for row in (layer(grid) > 0).int().tolist()}
    assert len(patterns) == 7 == round(10 ** dense_bound_log10(2, [3]))


def test_patch_reach_through_convolutions_and_pooling():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1), nn.ReLU())
    reach = patch_reach(plain, 1, (16, 16))
    assert reach.input_dim == 3 and reach.units == [4 * 9, 2 * 25] and reach.layer_sizes == [4 * 256, 2 * 256]
    pooled = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 5, 3, padding=1),
                           nn.ReLU())
    # 2x2 patch at rows/cols 7..8 -> conv reaches 6..9 (4x4), pooling 3..4 (2x2), conv 2..5 (4x4)
    assert patch_reach(pooled, 2, (16, 16)).units == [4 * 16, 5 * 16]


def test_regions_along_a_line_count_each_crossing():
    """Three ReLUs on a 1x1 image; along d = (1, 1, 1)/sqrt(3) unit k crosses zero at t = -b_k sqrt(3):
    -0.087, 0.52 and -1.04, all inside [-2, 2]: four linear regions."""
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU())
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        model[0].bias.copy_(torch.tensor([0.05, -0.3, 0.6]))
    along = [torch.ones(3, 1, 1)]
    assert regions_along_lines(model, torch.zeros(3, 1, 1), 0, 0, 1, samples=2001, radius=2.0, directions=along) == [4]
    # shorter, the line meets only the first unit's boundary; far from every boundary, it stays in one region
    assert regions_along_lines(model, torch.zeros(3, 1, 1), 0, 0, 1, samples=2001, radius=0.3, directions=along) == [2]
    assert regions_along_lines(model, torch.full((3, 1, 1), 5.0), 0, 0, 1, lines=2, samples=101, radius=0.5) == [1, 1]


def test_zoo_table_has_seed_000s_shape():
    rows = bounds_table(["unet", "lraspp_mobilenetv3"], [2, 5], classes=19, size=(128, 128), progress=False)
    assert {(r["arch"], r["patch"]) for r in rows} == {("unet", 2), ("unet", 5), ("lraspp_mobilenetv3", 2),
                                                      ("lraspp_mobilenetv3", 5)}
    for arch in ("unet", "lraspp_mobilenetv3"):
        small, large = (next(r for r in rows if r["arch"] == arch and r["patch"] == p) for p in (2, 5))
        assert 0 < small["conv_bound_log10"] < large["conv_bound_log10"] and small["conv_side"] < large["conv_side"]
        assert small["dense_bound_log10"] <= small["conv_bound_log10"] + 1e-9
    assert "| 2x2: arbitrary maps up to |" in bounds_markdown(rows)
    assert np.isfinite([r["conv_bound_log10"] for r in rows]).all()


def test_seed_worked_example():
    """Seed 000, 5.1: five typical layers (128 or 256 channels) over a patch of "around" N x N pixels allow 10
    classes arbitrary maps on at most 1500 pixels, 38x38, so each layer multiplies the regions by at most 10^300
    (N and the powers are lost with the seed's math). With D_0 = s^2 (one value per pixel) a 10x10 patch keeps
    both layers under it; with 3 s^2 they would give 10^616 and 10^707."""
    per_layer = [seed_bound_log10(10, [(channels, 64, 64)]) for channels in (128, 256)]
    assert per_layer == pytest.approx([252.586, 282.772], abs=1e-3) and max(per_layer) < 300
    assert conv_bound_log10(3 * 100, [256 * 100]) > 700
    assert arbitrary_map_side(5 * 300, 10) == 38
    # a map smaller than the patch caps n_l: a 1x1 squeeze of 64 channels has 64 units for any patch
    assert seed_bound_log10(20, [(64, 1, 1)]) == pytest.approx(64 * math.log10(2))


def test_gate_shapes_of_table_1_networks():
    fcn8 = gate_shapes(lambda: FCN8s(19), (1024, 2048))
    assert [c for c, _, _ in fcn8] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512, 4096, 4096]
    assert fcn8[0] == (64, 1024, 2048) and fcn8[-1] == (4096, 32, 64)
    unet = gate_shapes(lambda: RonnebergerUNet(19), (1024, 2048))
    assert [c for c, _, _ in unet] == [64, 64, 128, 128, 256, 256, 512, 512, 1024, 1024, 512, 512, 256, 256, 128,
                                       128, 64, 64]
    assert unet[8] == (1024, 64, 128)


def test_the_alternatives_the_assumptions_name_reproduce_no_published_cell():
    """The seed's own 8-64 U-Net for UNET, torchvision's FCNHead on VGG16 for FCN8: the report quotes their
    seed-mode sides; none is a published cell."""
    from torchvision.models import vgg16
    from torchvision.models.segmentation.fcn import FCNHead

    from audit.seed_table import SEED_ASSUMPTIONS, SEED_IMAGE_SIZE
    from segmenters.models import build_model

    architectures = dict((name, seed) for name, seed, _ in SEED_ASSUMPTIONS)["architectures"]
    def vgg_fcn_head():
        return nn.Sequential(vgg16(weights=None).features, FCNHead(512, 19))

    for builder, column, quoted in ((lambda: build_model("unet", 19), "UNET", "9/23/48/96"),
                                    (vgg_fcn_head, "FCN8", "10/27/55/111")):
        shapes = gate_shapes(builder, SEED_IMAGE_SIZE)
        sides = [arbitrary_map_side(seed_bound_log10(p, shapes), 19) for p in (2, 5, 10, 20)]
        assert "/".join(map(str, sides)) == quoted and quoted in architectures
        assert not any(side == PUBLISHED_TABLE_1[column][p] for side, p in zip(sides, (2, 5, 10, 20)))


def test_seed_mode_against_the_published_table_1():
    assert SEED_TABLE_1 == PUBLISHED_TABLE_1
    rows = seed_table(refined=False, progress=False)
    cells = {(r["column"], r["patch"]): r for r in rows}
    assert set(cells) == {(c, p) for c, sides in PUBLISHED_TABLE_1.items() for p in sides}
    for (column, patch), row in cells.items():
        reproduced = row["seed_side"] == PUBLISHED_TABLE_1[column][patch]
        assert reproduced == ((column, patch) in REPRODUCED), (column, patch, row["seed_side"])
    report = seed_markdown(rows)
    assert f"reproduces: {len(REPRODUCED)} of 16" in report
    for (column, patch), row in cells.items():
        if (column, patch) not in REPRODUCED:
            side = PUBLISHED_TABLE_1[column][patch]
            assert f"- {column} {patch}x{patch}: published {side}x{side} stands for" in report
    assert report.count("  - why: ") == len({c for c, p in cells if (c, p) not in REPRODUCED})
    assert "| input dimension D_0 |" in report and "| units N_l of a layer |" in report


def test_published_columns_need_an_extent_that_depends_on_the_patch():
    """With n_l = s a layer's log10 term per patch pixel never falls as s grows, so a column whose per-pixel
    interval at a larger patch lies below one at a smaller patch fits no list of such layers."""
    for d in (1, 2, 19, 64, 512, 4096):
        per_pixel = [log10_binomial_sum(d * s * s, s * s) / (s * s) for s in range(1, 25)]
        assert all(b >= a - 1e-12 for a, b in zip(per_pixel, per_pixel[1:])), d
    assert per_pixel_intervals("FCN8")[5][0] > per_pixel_intervals("FCN8")[20][1]
    assert not any(fits_patch_extent(column) for column in PUBLISHED_TABLE_1)
    # the check can pass: sides growing as 6 s, as n_l = s gives
    SEED_TABLE_1["growing"] = {2: 12, 5: 30, 10: 60, 20: 120}
    try:
        assert fits_patch_extent("growing")
    finally:
        del SEED_TABLE_1["growing"]


def test_seed_table_keeps_the_refined_bound_beside_it():
    rows = seed_table([2], refined_size=(64, 64), columns=["column 3"], progress=False)
    (row,) = rows
    assert row["seed_side"] == PUBLISHED_TABLE_1["column 3"][2] == 13
    refined = row["refined"]
    assert refined["arch"] == "deeplabv3_resnet18" and refined["patch"] == 2 and refined["conv_side"] > 0
    # the refined bound counts 3 s^2 inputs over the reach, the seed s^2 over the patch: here it is far larger
    assert refined["conv_bound_log10"] > row["seed_bound_log10"]
    report = seed_markdown(rows)
    assert f"| 2x2 | 13x13 / 13x13 = / {refined['conv_side']}x{refined['conv_side']}" in report


def test_bounds_command_in_seed_mode(tmp_path):
    from click.testing import CliRunner

    from audit.cli import audit

    result = CliRunner().invoke(audit, ["bounds", "--mode", "seed", "--skip-refined", "--arch", "fcn8s_vgg16",
                                        "--patch", "2", "--patch", "20", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "bounds.json").read_text())
    assert saved["mode"] == "seed" and [a["what"] for a in saved["assumptions"]][:2] == ["bound", "input dimension D_0"]
    cells = [(r["patch"], r["published_side"], r["seed_side"]) for r in saved["table_1"]]
    assert cells == [(2, 11, 11), (20, 118, 118)]
    assert "FCN8 (fcn8s_vgg16)" in (tmp_path / "bounds.md").read_text()
    refused = CliRunner().invoke(audit, ["bounds", "--mode", "seed", "--arch", "unet"])
    assert refused.exit_code != 0 and "unet_ronneberger" in refused.output
