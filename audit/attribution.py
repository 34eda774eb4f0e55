"""Attribution baselines and the tests attributions are judged by (thesis 002, section 4.3.3 and appendix A.2).

`GradCam` (Selvaraju et al. 2017) and `OcclusionMap` come from captum and explain the same score as `VGatt`
(the class logit summed over a region), so the three are interchangeable in `pixel_removal`: remove the k %
most relevant pixels by a method (black pixels, as appendix A.2), and measure how much the score moves and how
many of the region's labels change. A better attribution moves both more for the same k.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from audit.vgatt import VGatt, region_mask, segment_score

REMOVAL_FRACTIONS = (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08)


def _layer(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        raise ValueError(f"no layer {name!r} in {type(model).__name__}")
    return modules[name]


def _one_image(inputs, model: nn.Module | None = None) -> torch.Tensor:
    """(1, 3, H, W) on the model's device and in its dtype."""
    x = torch.as_tensor(inputs)
    if model is not None:
        parameter = next(model.parameters())
        x = x.to(parameter.device, parameter.dtype)
    x = x[None] if x.dim() == 3 else x
    if x.dim() != 4 or x.shape[:2] != (1, 3):
        raise ValueError(f"one image at a time: (3, H, W) or (1, 3, H, W), got {tuple(x.shape)}")
    return x.detach()


def _score_function(model: nn.Module, target: int, region, shape: tuple[int, int]):
    mask = region_mask(region, shape)
    return lambda x: segment_score(model(x), target, mask)


class GradCam:
    """Grad-CAM at a named layer through captum's `LayerGradCam`: channel weights are the spatially averaged
    gradients of the score (the approximation VGatt does without), the map is sum_k alpha_k A_k, unrectified."""

    def __init__(self, model: nn.Module, layer: str):
        from captum.attr import LayerGradCam

        self.model, self.layer = model.eval(), layer
        self._method = lambda forward: LayerGradCam(forward, _layer(model, layer))

    def attribute(self, inputs, target: int, region=None) -> np.ndarray:
        """(h, w) map at the layer's resolution."""
        x = _one_image(inputs, self.model)
        forward = _score_function(self.model, target, region, tuple(x.shape[-2:]))
        with torch.enable_grad():
            cam = self._method(forward).attribute(x, relu_attributions=False)
        return cam.detach()[0, 0].cpu().numpy()


class OcclusionMap:
    """Occlusion (Zeiler & Fergus 2014) through captum: the score drop when a `window` square is blacked out,
    slid with `stride`; the reference VGatt's thesis compares against (figure 4.8), and the costly one."""

    def __init__(self, model: nn.Module, window: int = 16, stride: int = 8, baseline: float = 0.0):
        from captum.attr import Occlusion

        self.model, self.window, self.stride, self.baseline = model.eval(), window, stride, baseline
        self._occlusion = Occlusion

    @torch.no_grad()
    def attribute(self, inputs, target: int, region=None) -> np.ndarray:
        x = _one_image(inputs, self.model)
        forward = _score_function(self.model, target, region, tuple(x.shape[-2:]))
        maps = self._occlusion(forward).attribute(
            x, sliding_window_shapes=(3, self.window, self.window), strides=(3, self.stride, self.stride),
            baselines=self.baseline, perturbations_per_eval=8)
        return maps.detach()[0].sum(0).cpu().numpy()


class VGattMap:
    """VGatt's contribution map summed over channels, in the same `attribute()` shape as the baselines."""

    def __init__(self, model: nn.Module, layer: str | None = None, dtype: torch.dtype = torch.float64):
        self.vgatt = VGatt(model, layer, dtype=dtype)
        self.layer = layer or "input"

    def attribute(self, inputs, target: int, region=None) -> np.ndarray:
        return self.vgatt.attribute(inputs, target, region).map


def upsample(attribution: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A layer-resolution (h, w) map brought to the image's (H, W), bilinearly (the usual Grad-CAM display)."""
    if attribution.shape == tuple(size):
        return attribution
    tensor = torch.as_tensor(attribution, dtype=torch.float64)[None, None]
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


@dataclass
class RemovalPoint:
    fraction: float  # share of the image's pixels removed
    score_change: float  # |F(X') - F(X)| / |F(X)|
    label_change: float  # share of the region's pixels whose label changed


@torch.no_grad()
def pixel_removal(model: nn.Module, inputs, target: int, region, attribution: np.ndarray, black: torch.Tensor,
                  fractions=REMOVAL_FRACTIONS) -> list[RemovalPoint]:
    """Appendix A.2 for a segmenter: black out the k % most relevant pixels (by `attribution`, (H, W), highest
    first) and measure the region's score and labels. `black` is the network-input value of a black pixel
    ((3,) per channel: normalisation turns 0 into -mean/std)."""
    x = _one_image(inputs, model)
    height, width = x.shape[-2:]
    if attribution.shape != (height, width):
        raise ValueError(f"attribution is {attribution.shape}, the image {height}x{width}: upsample it first")
    mask = region_mask(region, (height, width)).to(x.device)
    order = torch.as_tensor(np.argsort(-attribution.reshape(-1), kind="stable").copy(), device=x.device)
    clean = model(x)
    base = float(segment_score(clean, target, mask))
    clean_labels = clean.argmax(1)[0]
    points = []
    batch = []
    for fraction in fractions:
        removed = x.clone().reshape(1, 3, -1)
        top = order[: max(1, int(round(fraction * height * width)))]
        removed[0, :, top] = black.to(x.device, x.dtype).reshape(3, 1)
        batch.append(removed.reshape_as(x))
    logits = model(torch.cat(batch))
    scores = segment_score(logits, target, mask)
    labels = logits.argmax(1)
    for i, fraction in enumerate(fractions):
        points.append(RemovalPoint(
            fraction=float(fraction), score_change=abs(float(scores[i]) - base) / max(abs(base), 1e-12),
            label_change=float((labels[i][mask] != clean_labels[mask]).float().mean())))
    return points
