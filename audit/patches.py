"""Physical patches: where a patch goes on an object, and how it lands in an image under the expectation over
transformation (EOT) of seed 000 / Brown et al.: jitter of position, scale, rotation and perspective,
brightness/contrast and sensor noise, after average pooling (kernel 2, stride 1) of the optimised pixels.

Everything on the patch path is differentiable with respect to the patch, so the attack optimises through it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torchvision.transforms.v2 import functional as TF


@dataclass(frozen=True)
class Rect:
    top: int
    left: int
    height: int
    width: int

    @property
    def area(self) -> int:
        return self.height * self.width

    @property
    def center(self) -> tuple[float, float]:
        return self.top + (self.height - 1) / 2.0, self.left + (self.width - 1) / 2.0


def largest_inscribed_rectangle(mask: np.ndarray) -> Rect | None:
    """The largest axis-aligned rectangle of True pixels in a 2-D mask (None if the mask is empty).

    Row by row, each column's run of True pixels ending at that row is a histogram; the largest rectangle under
    a histogram falls out of one pass with a stack of increasing bars. O(H * W) in all.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    height, width = mask.shape
    runs = np.zeros(width + 1, dtype=np.int64)  # a zero bar at the end flushes the stack
    best, best_area = None, 0
    for row in range(height):
        runs[:width] = np.where(mask[row], runs[:width] + 1, 0)
        stack: list[int] = []
        for col in range(width + 1):
            while stack and runs[stack[-1]] >= runs[col]:
                bar = runs[stack.pop()]
                left = stack[-1] + 1 if stack else 0
                area = int(bar) * (col - left)
                if area > best_area:
                    best_area, best = area, Rect(row - int(bar) + 1, left, int(bar), col - left)
            stack.append(col)
    return best


def patch_position(mask: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left corner of a `size` x `size` patch centred in the largest inscribed rectangle of `mask`, kept
    inside the image. Centring quantises the area of effect: the patch sits inside the object, as a sticker
    would, instead of straddling several objects."""
    rect = largest_inscribed_rectangle(mask)
    if rect is None:
        raise ValueError("the target mask is empty: no object to put a patch on")
    row, col = rect.center
    height, width = np.asarray(mask).shape
    top = int(round(row - (size - 1) / 2.0))
    left = int(round(col - (size - 1) / 2.0))
    return min(max(top, 0), height - size), min(max(left, 0), width - size)


class EOTConfig(BaseModel):
    """The distribution a patch must survive; `EOTConfig.none()` is the nominal placement."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    jitter_px: float = Field(2.0, ge=0, description="uniform shift of the patch centre, pixels")
    scale: tuple[float, float] = Field((0.9, 1.1), description="patch scale range")
    rotation_deg: float = Field(10.0, ge=0, description="uniform rotation in +-degrees")
    perspective: float = Field(0.1, ge=0, lt=0.5, description="corner displacement, fraction of the patch side")
    brightness: float = Field(0.1, ge=0, description="additive brightness in +-")
    contrast: float = Field(0.1, ge=0, lt=1, description="contrast factor in 1 +- this")
    noise_std: float = Field(0.02, ge=0, description="Gaussian noise on the patch")

    @classmethod
    def none(cls) -> EOTConfig:
        return cls(jitter_px=0, scale=(1.0, 1.0), rotation_deg=0, perspective=0, brightness=0, contrast=0,
                   noise_std=0)

    @property
    def is_identity(self) -> bool:
        return self == EOTConfig.none()


def pool_patch(patch: torch.Tensor) -> torch.Tensor:
    """Average pooling with kernel 2, stride 1 (seed 000), replicate-padded so the patch keeps its size: the
    printed pixel is the mean of neighbouring optimised pixels, which prints and photographs more reliably."""
    return F.avg_pool2d(F.pad(patch[None], (0, 1, 0, 1), mode="replicate"), kernel_size=2, stride=1)[0]


def paste(images: torch.Tensor, patch: torch.Tensor, top: int, left: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nominal placement: (N, 3, H, W) images with the (3, s, s) patch replacing pixels at (top, left);
    returns (patched images, (H, W) bool mask of the patch)."""
    size = patch.shape[-1]
    mask = torch.zeros(images.shape[-2:], dtype=torch.bool, device=images.device)
    mask[top:top + size, left:left + size] = True
    patched = images.clone()
    patched[:, :, top:top + size, left:left + size] = patch
    return patched, mask


def apply_patch_eot(images: torch.Tensor, patch: torch.Tensor, top: int, left: int, eot: EOTConfig,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One random EOT draw per image: (N, 3, H, W) patched images and (N, 1, H, W) soft patch masks.

    The patch is photometrically altered (contrast, brightness, noise), rescaled, then warped onto the image
    plane by a random rotation + perspective about its (jittered) centre; the warp resamples bilinearly, so the
    result stays differentiable in the patch.
    """
    count, _, height, width = images.shape
    size = patch.shape[-1]
    device = images.device
    outputs, masks = [], []
    for _ in range(count):
        u = torch.rand(8, generator=generator).tolist()
        contrast = 1.0 + eot.contrast * (2 * u[0] - 1)
        brightness = eot.brightness * (2 * u[1] - 1)
        altered = (patch - 0.5) * contrast + 0.5 + brightness
        if eot.noise_std > 0:
            altered = altered + eot.noise_std * torch.randn(patch.shape, generator=generator).to(device)
        altered = altered.clamp(0.0, 1.0)
        scale = eot.scale[0] + (eot.scale[1] - eot.scale[0]) * u[2]
        side = max(1, int(round(size * scale)))
        if side != size:
            altered = F.interpolate(altered[None], size=(side, side), mode="bilinear", align_corners=False)[0]
        centre_row = top + (size - 1) / 2.0 + eot.jitter_px * (2 * u[3] - 1)
        centre_col = left + (size - 1) / 2.0 + eot.jitter_px * (2 * u[4] - 1)
        row0 = int(round(centre_row - (side - 1) / 2.0))
        col0 = int(round(centre_col - (side - 1) / 2.0))
        row0, col0 = min(max(row0, 0), height - side), min(max(col0, 0), width - side)
        canvas = torch.zeros((4, height, width), device=device, dtype=images.dtype)
        canvas[:3, row0:row0 + side, col0:col0 + side] = altered
        canvas[3, row0:row0 + side, col0:col0 + side] = 1.0
        angle = math.radians(eot.rotation_deg * (2 * u[5] - 1))
        if angle != 0.0 or eot.perspective > 0:
            canvas = _warp(canvas, row0, col0, side, angle, eot.perspective, generator)
        mask = canvas[3:4].clamp(0.0, 1.0)
        outputs.append(images[len(outputs)] * (1 - mask) + canvas[:3] * mask)
        masks.append(mask)
    return torch.stack(outputs), torch.stack(masks)


def _warp(canvas: torch.Tensor, row0: int, col0: int, side: int, angle: float, perspective: float,
          generator: torch.Generator) -> torch.Tensor:
    # corners (x, y) of the pasted patch, rotated about its centre, each pushed by up to `perspective` x side
    cx, cy = col0 + (side - 1) / 2.0, row0 + (side - 1) / 2.0
    half = side / 2.0
    start = [[cx - half, cy - half], [cx + half, cy - half], [cx + half, cy + half], [cx - half, cy + half]]
    cos, sin = math.cos(angle), math.sin(angle)
    shifts = (torch.rand((4, 2), generator=generator) * 2 - 1) * perspective * side
    end = []
    for (x, y), (dx, dy) in zip(start, shifts.tolist()):
        rx, ry = x - cx, y - cy
        end.append([cx + cos * rx - sin * ry + dx, cy + sin * rx + cos * ry + dy])
    # fill=None: grid_sample's zero padding; a fill value makes torchvision blend in place, breaking autograd
    return TF.perspective(canvas, start, end, interpolation=TF.InterpolationMode.BILINEAR, fill=None)
