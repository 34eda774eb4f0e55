import math

import numpy as np
import pytest
import torch

from segmenters.edges import boundary_band, semantic_edge_map
from segmenters.metrics import (
    SegmentationMetrics, confusion_matrix, e_measure, entropy_map, f1_from_confusion, iou_from_confusion,
)


def test_edge_map_marks_pixels_without_eight_identical_neighbours():
    labels = torch.zeros(6, 6, dtype=torch.long)
    labels[2:4, 2:4] = 1
    expected = torch.tensor(
        [
            [0, 0, 0, 0, 0, 0],
            [0, 1, 1, 1, 1, 0],
            [0, 1, 1, 1, 1, 0],
            [0, 1, 1, 1, 1, 0],
            [0, 1, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 0],
        ]
    )
    assert torch.equal(semantic_edge_map(labels), expected)


def test_edge_map_of_a_vertical_boundary_and_the_image_border():
    labels = torch.tensor([[0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 2, 2]])
    # Columns 1 and 2 touch the other class; the image border itself is no edge.
    expected = torch.tensor([[0, 1, 1, 0]] * 3)
    assert torch.equal(semantic_edge_map(labels), expected)
    assert semantic_edge_map(torch.full((4, 4), 3)).sum() == 0


def test_edge_map_marks_ignored_neighbourhoods_unknown():
    labels = torch.zeros(5, 5, dtype=torch.long)
    labels[0, 0] = 255
    edges = semantic_edge_map(labels, ignore_index=255)
    assert edges[0, 0] == 255 and edges[1, 1] == 255 and edges[0, 1] == 255
    assert edges[2, 2] == 0
    batch = semantic_edge_map(torch.stack([labels, labels]))
    assert batch.shape == (2, 5, 5)


def test_boundary_band_widths():
    labels = torch.zeros(1, 9, 9, dtype=torch.long)
    labels[:, :, 5:] = 1  # boundary between columns 4 and 5
    assert boundary_band(labels, 1)[0].nonzero()[:, 1].unique().tolist() == [4, 5]
    assert boundary_band(labels, 3)[0].nonzero()[:, 1].unique().tolist() == [2, 3, 4, 5, 6, 7]
    with pytest.raises(ValueError):
        boundary_band(labels, 0)


def test_confusion_iou_f1_against_hand_counts():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 1]])
    cm = confusion_matrix(pred, target, 3)
    # rows = truth: class 0 -> {0:1, 1:1}; class 1 -> {1:3}; class 2 -> {2:1, 0:1}; the 255 pixel is skipped
    assert cm.tolist() == [[1, 1, 0], [0, 3, 0], [1, 0, 1]]
    iou = iou_from_confusion(cm)
    np.testing.assert_allclose(iou, [1 / 3, 3 / 4, 1 / 2])
    np.testing.assert_allclose(f1_from_confusion(cm), [2 / 4, 6 / 7, 2 / 3])


def test_absent_classes_do_not_count_in_miou():
    target = torch.tensor([[0, 0], [1, 1]])
    metrics = SegmentationMetrics(num_classes=3, bands=())
    metrics.update(target.clone()[None], target[None])
    report = metrics.report(["a", "b", "c"])
    assert report["miou"] == 1.0
    assert report["per_class"]["c"]["iou"] is None


def test_e_measure_by_hand():
    gt = np.array([1, 1, 0, 0])
    pred = np.array([1, 0, 0, 0])
    # phi_gt = (.5,.5,-.5,-.5), phi_pred = (.75,-.25,-.25,-.25); xi = (12/13, -.8, .8, .8)
    expected = np.mean([(1 + 12 / 13) ** 2 / 4, 0.2**2 / 4, 1.8**2 / 4, 1.8**2 / 4])
    assert e_measure(pred, gt) == pytest.approx(expected)
    assert e_measure(gt, gt) == pytest.approx(1.0)
    assert e_measure(np.zeros(4), np.zeros(4)) == 1.0
    assert e_measure(1 - gt, gt) < 0.1


def test_entropy_map_limits():
    uniform = torch.zeros(1, 4, 2, 2)
    assert torch.allclose(entropy_map(uniform), torch.ones(1, 2, 2))
    confident = torch.zeros(1, 4, 2, 2)
    confident[:, 0] = 50.0
    assert entropy_map(confident).max() < 1e-6
    assert entropy_map(uniform, normalized=False)[0, 0, 0] == pytest.approx(math.log(4))


def test_trimap_separates_boundary_errors_from_interior_errors():
    target = torch.zeros(1, 12, 12, dtype=torch.long)
    target[:, :, 6:] = 1
    pred = target.clone()
    pred[:, :, 6] = 0  # errors only along the boundary
    metrics = SegmentationMetrics(num_classes=2, bands=(1, 3))
    metrics.update(pred, target)
    trimap = {row["band_width"]: row for row in metrics.report()["trimap"]}
    assert trimap[1]["non_boundary_miou"] == 1.0
    assert trimap[1]["boundary_miou"] < 0.5
    assert trimap[3]["boundary_miou"] > trimap[1]["boundary_miou"]


def test_trimap_mean_is_over_classes_with_ground_truth_in_the_region():
    target = torch.zeros(1, 12, 12, dtype=torch.long)
    target[:, :, 8:] = 1
    pred = target.clone()
    pred[:, 0, 0] = 2  # a stray class far from the boundary, absent from the ground truth
    metrics = SegmentationMetrics(num_classes=3, bands=(2,))
    metrics.update(pred, target)
    row = metrics.report()["trimap"][0]
    # Outside the band (columns 0-5 and 10-11): class 0 loses one pixel, class 1 is perfect, class 2 is not averaged.
    outside_class0 = (target[0, :, :6] == 0).sum().item()
    assert row["non_boundary_miou"] == pytest.approx(((outside_class0 - 1) / outside_class0 + 1.0) / 2)
