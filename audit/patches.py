"""Physical patches: where a patch goes on an object, and how it lands in an image under the expectation over
transformation (EOT) of seed 000 / Brown et al.: jitter of position, scale, rotation and perspective,
brightness/contrast and sensor noise, after average pooling (kernel 2, stride 1) of the optimised pixels.

Everything on the patch path is differentiable with respect to the patch, so the attack optimises through it.
The draws of one step are placed as one batch on the images' device, with their random numbers drawn there
from the caller's generator: the same seed on the same device gives the same draws and the same gradients.
Resampling is bilinear by plain indexing in float64, whose gradient is accumulated in a fixed order on the CPU
and on CUDA alike (`grid_sample`'s CUDA backward adds with atomics, in no fixed order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator


#: pixels beyond a sample point that bilinear resampling reads
_BILINEAR_SUPPORT = 1.0


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
    #: below 1/4 of the side, displaced corners always bound a convex quadrilateral (a view of a flat square);
    #: beyond it they can fold the patch into a shape no camera sees and no homography draws
    perspective: float = Field(0.1, ge=0, lt=0.25, description="corner displacement, fraction of the patch side")
    brightness: float = Field(0.1, ge=0, description="additive brightness in +-")
    contrast: float = Field(0.1, ge=0, lt=1, description="contrast factor in 1 +- this")
    noise_std: float = Field(0.02, ge=0, description="Gaussian noise on the patch")

    @field_validator("scale")
    @classmethod
    def _scale_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1]:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {value}")
        return value

    @classmethod
    def none(cls) -> EOTConfig:
        return cls(jitter_px=0, scale=(1.0, 1.0), rotation_deg=0, perspective=0, brightness=0, contrast=0,
                   noise_std=0)

    @property
    def is_identity(self) -> bool:
        return self == EOTConfig.none()

    def reach(self, size: int) -> float:
        """How far (pixels, along either axis) a drawn `size` patch can extend from its nominal centre: the
        jitter, the shift that keeps a scaled-up patch inside the image, the half-diagonal of the largest side
        under any rotation, the corner displacement, and one pixel of bilinear support."""
        side = size * self.scale[1]
        return (self.jitter_px + max(side - size, 0.0) / 2 + side * (math.sqrt(2.0) / 2 + self.perspective)
                + _BILINEAR_SUPPORT)


def pool_patch(patch: torch.Tensor) -> torch.Tensor:
    """Average pooling with kernel 2, stride 1 (seed 000), replicate-padded so the patch keeps its size: the
    printed pixel is the mean of neighbouring optimised pixels, which prints and photographs more reliably.
    The padding repeats the last row and column by concatenation: its gradient is a plain sum (F.pad's
    replicate mode adds gradients with atomics on CUDA, in no fixed order)."""
    padded = torch.cat([patch, patch[:, -1:]], dim=1)
    padded = torch.cat([padded, padded[:, :, -1:]], dim=2)
    return F.avg_pool2d(padded[None], kernel_size=2, stride=1)[0]


def paste(images: torch.Tensor, patch: torch.Tensor, top: int, left: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nominal placement: (N, 3, H, W) images with the (3, s, s) patch replacing pixels at (top, left);
    returns (patched images, (H, W) bool mask of the patch)."""
    size = patch.shape[-1]
    mask = torch.zeros(images.shape[-2:], dtype=torch.bool, device=images.device)
    mask[top:top + size, left:left + size] = True
    patched = images.clone()
    patched[:, :, top:top + size, left:left + size] = patch
    return patched, mask


#: uniform numbers per draw: contrast, brightness, scale, jitter (x, y), rotation, 4 corner shifts (x, y)
_UNIFORMS_PER_DRAW = 14
#: a window point whose projective depth is below this lies beyond the warp's horizon: it samples nothing
_MIN_DEPTH = 1e-9


@dataclass(frozen=True, eq=False)
class EOTDraws:
    """Random EOT draws, one row per draw, on the device they were drawn on (`draw_eot`)."""

    contrast: torch.Tensor  # (N,) factor about mid-grey
    brightness: torch.Tensor  # (N,) added
    scale: torch.Tensor  # (N,) of the patch side
    jitter: torch.Tensor  # (N, 2) (x, y) shift of the centre, pixels
    angle: torch.Tensor  # (N,) rotation, radians
    corner_shifts: torch.Tensor  # (N, 4, 2) (x, y) per corner, fractions of the drawn side
    noise: torch.Tensor | None  # (N, 3, s, s) sensor noise, None without

    def __len__(self) -> int:
        return len(self.contrast)

    @property
    def device(self) -> torch.device:
        return self.contrast.device

    def __getitem__(self, rows: slice) -> EOTDraws:
        return EOTDraws(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[rows]
                           for f in fields(self)})


def draw_eot(count: int, size: int, eot: EOTConfig, generator: torch.Generator) -> EOTDraws:
    """`count` draws for a `size` x `size` patch, as one batch of random numbers from `generator`, on the
    generator's device."""
    device = generator.device
    signed = torch.rand((count, _UNIFORMS_PER_DRAW), generator=generator, device=device) * 2 - 1
    noise = None
    if eot.noise_std > 0:
        noise = eot.noise_std * torch.randn((count, 3, size, size), generator=generator, device=device)
    low, high = eot.scale
    return EOTDraws(contrast=1 + eot.contrast * signed[:, 0], brightness=eot.brightness * signed[:, 1],
                    scale=low + (high - low) * (signed[:, 2] + 1) / 2, jitter=eot.jitter_px * signed[:, 3:5],
                    angle=math.radians(eot.rotation_deg) * signed[:, 5],
                    corner_shifts=eot.perspective * signed[:, 6:].reshape(count, 4, 2), noise=noise)


def apply_patch_eot(images: torch.Tensor, patch: torch.Tensor, top: int, left: int, eot: EOTConfig,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One random EOT draw per image, drawn as one batch from `generator` (on the images' device): (N, 3, H, W)
    patched images and (N, 1, H, W) soft patch masks. See `place_patch`."""
    return place_patch(images, patch, top, left, eot, draw_eot(len(images), patch.shape[-1], eot, generator))


def place_patch(images: torch.Tensor, patch: torch.Tensor, top: int, left: int, eot: EOTConfig,
                draws: EOTDraws) -> tuple[torch.Tensor, torch.Tensor]:
    """Image n gets the (3, s, s) patch under draw n: (N, 3, H, W) patched images and (N, 1, H, W) masks (the
    patch's coverage of each pixel, in [0, 1]).

    The patch is photometrically altered (contrast, brightness, noise), then resampled once, bilinearly, onto
    the image plane: scaled, rotated and perspective-distorted about its jittered centre (the centre kept
    where the scaled patch fits the image). Only a window around the patch (`EOTConfig.reach`) is resampled.
    The identity distribution is `paste`."""
    count, _, height, width = images.shape
    if len(draws) != count:
        raise ValueError(f"{len(draws)} EOT draws for {count} images: one draw per image")
    if draws.device != images.device:
        raise ValueError(f"the EOT draws are on {draws.device}, the images on {images.device}: draw them with a "
                         "generator on the images' device")
    size = patch.shape[-1]
    if eot.is_identity:
        patched, mask = paste(images, patch, top, left)
        return patched, mask[None, None].to(images.dtype).expand(count, 1, -1, -1)
    rows, cols = _window(height, width, size, top, left, eot)
    corners = _drawn_corners(draws, size, top, left, height, width)
    x, y = _window_to_patch(corners, rows, cols, size)
    altered = _photometric(patch, draws)
    warped = _bilinear(torch.cat([altered, torch.ones_like(altered[:, :1])], dim=1), x, y).to(images.dtype)
    coverage = warped[:, 3:].clamp(0.0, 1.0)
    patched = images.clone()
    # the colour is premultiplied by its coverage (both resampled with the same weights), so this stays in [0, 1]
    patched[:, :, rows, cols] = images[:, :, rows, cols] * (1 - coverage) + warped[:, :3]
    masks = images.new_zeros((count, 1, height, width))
    masks[:, :, rows, cols] = coverage
    return patched, masks


def _photometric(patch: torch.Tensor, draws: EOTDraws) -> torch.Tensor:
    """(N, 3, s, s): contrast about mid-grey, brightness and sensor noise per draw, clipped to [0, 1]."""
    altered = (patch[None] - 0.5) * draws.contrast[:, None, None, None] + 0.5 + draws.brightness[:, None, None, None]
    if draws.noise is not None:
        altered = altered + draws.noise
    return altered.clamp(0.0, 1.0)


def _window(height: int, width: int, size: int, top: int, left: int, eot: EOTConfig) -> tuple[slice, slice]:
    """The rows and columns any draw of a `size` patch at (top, left) can touch, within the image."""
    reach = eot.reach(size)
    centre_y, centre_x = top + size / 2, left + size / 2
    rows = slice(max(0, math.floor(centre_y - reach)), min(height, math.ceil(centre_y + reach)))
    cols = slice(max(0, math.floor(centre_x - reach)), min(width, math.ceil(centre_x + reach)))
    return rows, cols


def _drawn_corners(draws: EOTDraws, size: int, top: int, left: int, height: int, width: int) -> torch.Tensor:
    """(N, 4, 2) image-plane (x, y) corners of each drawn patch, clockwise from the top left (continuous
    coordinates: pixel i spans [i, i + 1)). Built from the draws alone: no tensor crosses from the host."""
    side = size * draws.scale
    half = side / 2
    centre_x = (left + size / 2 + draws.jitter[:, 0]).clamp(min=half, max=width - half)
    centre_y = (top + size / 2 + draws.jitter[:, 1]).clamp(min=half, max=height - half)
    offset_x = torch.stack([-half, half, half, -half], dim=1)
    offset_y = torch.stack([-half, -half, half, half], dim=1)
    cos, sin = draws.angle.cos()[:, None], draws.angle.sin()[:, None]
    corners = torch.stack([centre_x[:, None] + cos * offset_x - sin * offset_y,
                           centre_y[:, None] + sin * offset_x + cos * offset_y], dim=-1)
    return corners + draws.corner_shifts * side[:, None, None]


def _window_to_patch(corners: torch.Tensor, rows: slice, cols: slice, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every window pixel centre and draw, the patch pixel coordinates it samples (patch pixel i's centre
    at i), (N, h, w) each: the homography taking each drawn quadrilateral onto the patch's unit square. In
    float64, with window coordinates in patch sides."""
    quads = torch.stack([corners[..., 0] - cols.start, corners[..., 1] - rows.start], dim=-1).double() / size
    homography = _inverse(_square_to_quad(quads))
    # the sign that puts each quadrilateral in front of its homography's horizon
    centroid = quads.mean(dim=1)
    depth = homography[:, 2, 0] * centroid[:, 0] + homography[:, 2, 1] * centroid[:, 1] + homography[:, 2, 2]
    homography = homography * depth.sign()[:, None, None]
    xs = (torch.arange(cols.stop - cols.start, dtype=torch.float64, device=quads.device) + 0.5) / size
    ys = (torch.arange(rows.stop - rows.start, dtype=torch.float64, device=quads.device) + 0.5) / size
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    points = torch.stack([grid_x, grid_y, torch.ones_like(grid_x)], dim=-1)
    mapped = torch.einsum("nij,hwj->nhwi", homography, points)
    depth = mapped[..., 2]
    ahead = depth > _MIN_DEPTH
    depth = torch.where(ahead, depth, 1.0)
    # beyond the horizon: a point far outside the patch (zero coverage)
    u = torch.where(ahead, mapped[..., 0] / depth, -1.0)
    v = torch.where(ahead, mapped[..., 1] / depth, -1.0)
    return u * size - 0.5, v * size - 0.5


def _square_to_quad(quads: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) projective maps of the unit square's corners (0, 0), (1, 0), (1, 1), (0, 1) onto each of the
    (N, 4, 2) quadrilaterals' corners, in closed form (Heckbert 1989): no linear solve, no host sync."""
    x, y = quads[..., 0], quads[..., 1]
    dx1, dx2, dx3 = x[:, 1] - x[:, 2], x[:, 3] - x[:, 2], x[:, 0] - x[:, 1] + x[:, 2] - x[:, 3]
    dy1, dy2, dy3 = y[:, 1] - y[:, 2], y[:, 3] - y[:, 2], y[:, 0] - y[:, 1] + y[:, 2] - y[:, 3]
    determinant = dx1 * dy2 - dx2 * dy1  # non-zero for any quadrilateral that is not degenerate
    g = (dx3 * dy2 - dx2 * dy3) / determinant
    h = (dx1 * dy3 - dx3 * dy1) / determinant
    first = torch.stack([x[:, 1] - x[:, 0] + g * x[:, 1], x[:, 3] - x[:, 0] + h * x[:, 3], x[:, 0]], dim=-1)
    second = torch.stack([y[:, 1] - y[:, 0] + g * y[:, 1], y[:, 3] - y[:, 0] + h * y[:, 3], y[:, 0]], dim=-1)
    return torch.stack([first, second, torch.stack([g, h, torch.ones_like(g)], dim=-1)], dim=1)


def _inverse(homography: torch.Tensor) -> torch.Tensor:
    """The inverse up to scale (the adjugate: rows are cross products of the columns), which is all a
    homography needs; its sign is fixed by the caller."""
    c0, c1, c2 = homography[..., 0], homography[..., 1], homography[..., 2]
    return torch.stack([torch.linalg.cross(c1, c2), torch.linalg.cross(c2, c0), torch.linalg.cross(c0, c1)], dim=1)


def _bilinear(source: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of `source` (N, C, s, s) at float64 pixel coordinates `x`, `y` (N, h, w) (pixel i's
    centre at i), zero beyond its edges: (N, C, h, w) in float64.

    Plain indexing, so the gradient is summed by `index_put`: on CUDA by sorting the indices (a fixed order),
    on the CPU serially for float64 (its parallel accumulation, atomic and in no fixed order, is float32's).
    Hence float64 here: the same seed gives the same patch on either device."""
    count, _, height, width = source.shape
    padded = F.pad(source.double(), (1, 1, 1, 1)).permute(0, 2, 3, 1)  # a zero border: taps beyond the edge read it
    x0, y0 = x.floor(), y.floor()
    wx, wy = (x - x0)[..., None], (y - y0)[..., None]
    batch = torch.arange(count, device=source.device)[:, None, None]

    def tap(down: int, right: int) -> torch.Tensor:
        row = (y0 + down).clamp(-1, height).long() + 1
        col = (x0 + right).clamp(-1, width).long() + 1
        return padded[batch, row, col]

    top = (1 - wx) * tap(0, 0) + wx * tap(0, 1)
    bottom = (1 - wx) * tap(1, 0) + wx * tap(1, 1)
    return ((1 - wy) * top + wy * bottom).permute(0, 3, 1, 2)
