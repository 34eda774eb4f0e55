"""Semantic edge maps and boundary bands from label maps, shared by the SEMEDA loss and the trimap metric."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _neighbourhood_max(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Max over a (2r+1)^2 window with replicate padding, for (N, H, W) float tensors."""
    k = 2 * radius + 1
    padded = F.pad(x[:, None], (radius, radius, radius, radius), mode="replicate")
    return F.max_pool2d(padded, kernel_size=k, stride=1)[:, 0]


def semantic_edge_map(labels: torch.Tensor, ignore_index: int | None = 255) -> torch.Tensor:
    """Thesis section 3.3.3: a pixel is an edge (1) unless all 8 neighbours carry its label (0).

    `labels` is (N, H, W) or (H, W) integer. Pixels outside the image count as copies of the border pixel
    (the image border is not a semantic edge). A pixel that is `ignore_index`, or has an ignored neighbour,
    gets `ignore_index`: whether it lies on an edge is unknown.
    """
    squeeze = labels.dim() == 2
    lab = labels[None] if squeeze else labels
    if lab.dim() != 3:
        raise ValueError(f"labels must be (H, W) or (N, H, W), got shape {tuple(labels.shape)}")
    x = lab.to(torch.float32)
    differs = _neighbourhood_max(x, 1) != -_neighbourhood_max(-x, 1)
    edges = differs.to(torch.long)
    if ignore_index is not None:
        ignored = _neighbourhood_max((lab == ignore_index).to(torch.float32), 1) > 0
        edges[ignored] = ignore_index
    return edges[0] if squeeze else edges


def boundary_band(labels: torch.Tensor, width: int, ignore_index: int | None = 255) -> torch.Tensor:
    """Trimap band of `width` pixels: pixels whose Chebyshev distance to a ground-truth edge pixel is
    below `width` (width 1 = the edge pixels themselves). Returns a bool map shaped like `labels`."""
    if width < 1:
        raise ValueError(f"band width must be >= 1, got {width}")
    squeeze = labels.dim() == 2
    lab = labels[None] if squeeze else labels
    edges = semantic_edge_map(lab, ignore_index) == 1
    band = _neighbourhood_max(edges.to(torch.float32), width - 1) > 0 if width > 1 else edges
    return band[0] if squeeze else band
