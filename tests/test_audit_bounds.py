"""Seed 000's complexity bound: the formulas on cases counted by hand, the patch's reach through real layer
stacks, the empirical region count along lines, and the zoo table."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from audit.bounds import (arbitrary_map_side, bounds_markdown, bounds_table, conv_bound_log10, dense_bound_log10,
                          log10_binomial_sum, patch_reach, regions_along_lines)


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
