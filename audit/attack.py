"""The patch attack of seed 000 against a twin: a patch inside the target object, optimised with the momentum
iterative method (Dong et al. 2018) under EOT to force a target label map, and the measurements of a trial.

Targets (`Target`): switch an object's class (the scripted attack of seed 000), an arbitrary hand-drawn target
label map (PNG; 255 = don't care), or make a class disappear. The loss is pixel cross-entropy towards the
target over the target region; with `skip_flipped` pixels already showing their target are left alone, so the
patch spends its effort on the pixels still to flip.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from audit.patches import EOTConfig, apply_patch_eot, draw_eot, paste, place_patch, pool_patch
from segmenters.device import native_bf16
from segmenters.twin import Twin

IGNORE = 255
#: EOT draws of a trial's measurement run through the twin at once (bounds memory; results do not depend on it)
EOT_EVAL_BATCH = 8


@dataclass
class Target:
    """What the attacker wants: `labels` (H, W) target class per pixel, IGNORE where anything goes."""

    kind: str  # "switch" | "mask" | "disappear"
    labels: np.ndarray
    #: the class to remove ("disappear"): success there is "not this class", whatever it became
    removed_class: int | None = None
    description: str = ""

    @property
    def region(self) -> np.ndarray:
        return self.labels != IGNORE


def class_switch_target(object_mask: np.ndarray, to_class: int, from_class: int | None = None) -> Target:
    """The object's pixels should read `to_class`; the object's shape is kept (seed 000's scripted attack)."""
    labels = np.full(object_mask.shape, IGNORE, np.int64)
    labels[np.asarray(object_mask, bool)] = to_class
    about = f"class {from_class} -> {to_class}" if from_class is not None else f"-> class {to_class}"
    return Target("switch", labels, description=about)


def mask_target(path: str | Path, num_classes: int, shape: tuple[int, int]) -> Target:
    """A hand-drawn target: a PNG of class indices (palette or grey), 255 where the attacker does not care."""
    from PIL import Image

    try:
        image = Image.open(path)
        labels = np.asarray(image if image.mode in ("P", "L", "I", "I;16") else image.convert("L")).astype(np.int64)
    except OSError as exc:
        raise ValueError(f"target mask {path}: cannot read it as an image ({exc})") from exc
    if labels.shape != tuple(shape):
        raise ValueError(f"target mask {path} is {labels.shape[1]}x{labels.shape[0]}, the image is "
                         f"{shape[1]}x{shape[0]}")
    bad = np.unique(labels[(labels != IGNORE) & ((labels < 0) | (labels >= num_classes))])
    if bad.size:
        raise ValueError(f"target mask {path} has values {bad.tolist()} that are not classes (0..{num_classes - 1} "
                         f"or {IGNORE} for don't care)")
    if not (labels != IGNORE).any():
        raise ValueError(f"target mask {path} marks no pixel (all {IGNORE})")
    return Target("mask", labels, description=f"mask {Path(path).name}")


def disappear_target(clean_logits: np.ndarray, removed_class: int) -> Target:
    """Pixels now predicted `removed_class` should read their best other class (a targeted, bounded loss)."""
    predicted = clean_logits.argmax(0)
    region = predicted == removed_class
    if not region.any():
        raise ValueError(f"class {removed_class} is not predicted anywhere in the image: nothing to make disappear")
    others = clean_logits.copy()
    others[removed_class] = -np.inf
    labels = np.where(region, others.argmax(0), IGNORE).astype(np.int64)
    return Target("disappear", labels, removed_class=removed_class, description=f"class {removed_class} disappears")


class AttackConfig(BaseModel):
    """The momentum iterative method under EOT."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    steps: int = Field(200, ge=1)
    step_size: float = Field(2.0 / 255.0, gt=0, description="alpha: sign-step in [0, 1] pixel units")
    momentum: float = Field(1.0, ge=0, description="mu: decay of the accumulated normalised gradient")
    eot_samples: int = Field(4, ge=1, description="EOT draws averaged per step")
    eot: EOTConfig = EOTConfig()
    pool: bool = True
    skip_flipped: bool = True
    #: stop early once this share of the target region holds under the nominal placement
    stop_at_success: float | None = Field(None, gt=0, le=1)
    #: the optimisation's forward and backward passes: fp32, or bf16 autocast (CPUs with AMX and recent GPUs run
    #: it several times faster; elsewhere it is emulated and slower), or auto: bf16 where the trial's device does it
    #: in hardware (segmenters.device.native_bf16), else fp32. The patch stays fp32 and a trial is always measured
    #: on the fp32 twin.
    precision: Literal["fp32", "bf16", "auto"] = "fp32"


@dataclass
class AttackResult:
    patch: np.ndarray  # (3, s, s) float in [0, 1]: what gets printed (pooled when the attack pools)
    top: int
    left: int
    losses: list[float] = field(default_factory=list)
    successes: list[float] = field(default_factory=list)
    steps: int = 0


def target_loss(logits: torch.Tensor, target: torch.Tensor, skip_flipped: bool) -> torch.Tensor:
    """Mean pixel CE towards `target` (N, H, W; IGNORE elsewhere); flipped pixels optionally left alone.

    Per-pixel losses summed by a plain reduction: CUDA's summing cross-entropy adds across blocks with
    atomics, in no fixed order."""
    if skip_flipped:
        target = torch.where(logits.argmax(1) == target, torch.full_like(target, IGNORE), target)
    losses = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="none").sum()
    return losses / (target != IGNORE).sum().clamp(min=1)


def achieved(predicted: np.ndarray, target: Target) -> np.ndarray:
    """(H, W) bool: pixels showing what the attacker wanted (the goal class, or no longer the removed class)."""
    if target.removed_class is not None:
        return predicted != target.removed_class
    return predicted == target.labels


def success_rate(predicted: np.ndarray, target: Target, exclude: np.ndarray | None = None) -> float:
    """Share of the target region showing what was wanted, over the region's pixels outside `exclude`.

    Pass the patch's own pixels as `exclude`: a patch pasted over the object trivially "flips" the pixels it
    covers, and for large patches on small objects that alone would read as success (seed 000 counts the
    effect of the patch on the rest of the scene)."""
    region = target.region if exclude is None else target.region & ~exclude
    if not region.any():
        return float("nan")
    return float(achieved(predicted, target)[region].mean())


class DeviceTarget:
    """A `Target` on a device: the goal labels, and success counted there (no host copy per prediction)."""

    def __init__(self, target: Target, device: torch.device):
        self.target = target
        self.goal = torch.as_tensor(target.labels, device=device)
        self.region = self.goal != IGNORE

    def achieved(self, predicted: torch.Tensor) -> torch.Tensor:
        if self.target.removed_class is not None:
            return predicted != self.target.removed_class
        return predicted == self.goal

    def counts(self, predicted: torch.Tensor, exclude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hits, pixels) per prediction ((N, H, W) labels, (N, H, W) or (H, W) bool `exclude`): region pixels
        outside `exclude` that show what was wanted, and all region pixels outside it; `success_rate` is
        hits / pixels (nan where pixels is 0)."""
        scored = self.region & ~exclude
        return (self.achieved(predicted) & scored).sum(dim=(-2, -1)), scored.expand_as(predicted).sum(dim=(-2, -1))


def rates(hits: torch.Tensor, pixels: torch.Tensor) -> list[float]:
    """Success rates from `DeviceTarget.counts` (one host copy): the same numbers `success_rate` gives."""
    return [hit / total if total else float("nan") for hit, total in zip(hits.tolist(), pixels.tolist())]


@contextlib.contextmanager
def deterministic_convolutions() -> Iterator[None]:
    """Within: cuDNN picks only deterministic convolution algorithms (and never benchmarks), so an attack on a
    given GPU repeats itself; restored after. No effect on the CPU, whose kernels are deterministic already.
    Layers without a deterministic CUDA backward (bilinear upsampling: DeepLabV3, LR-ASPP, ladder DenseNet)
    still accumulate in no fixed order; the U-Net has none."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def attack_precision(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Within: the twin's forward (and so its backward) runs in `precision`: bf16 under autocast, else as is."""
    if precision == "fp32" or (precision == "auto" and not native_bf16(device)):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def model_device(twin: Twin) -> torch.device:
    return next(twin.model.parameters()).device


def patch_attack(twin: Twin, image: np.ndarray | torch.Tensor, target: Target, size: int, top: int, left: int,
                 config: AttackConfig = AttackConfig(), seed: int = 0, progress=None) -> AttackResult:
    """Optimise a `size` x `size` patch at (top, left) of `image` ((3, H, W) in [0, 1]) towards `target`, on
    the twin's device.

    Momentum iterative method (Dong et al. 2018), descending the targeted loss:
        g <- mu * g + grad / ||grad||_1 ;  raw <- clip(raw - alpha * sign(g), 0, 1)
    with the gradient the mean over `eot_samples` EOT draws (one batch), through the average pooling of the
    patch. The initial patch and every draw come from one generator on the device, seeded with `seed`: the
    same seed on the same device gives the same patch. Losses and successes stay on the device until the end,
    unless `progress` or `stop_at_success` needs them at each step.
    """
    model = twin.model.eval()
    device = model_device(twin)
    image = _image_on(image, device)
    height, width = image.shape[1:]
    if not (0 <= top <= height - size and 0 <= left <= width - size):
        raise ValueError(f"a {size}x{size} patch at ({top}, {left}) does not fit a {height}x{width} image")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    generator = torch.Generator(device=device).manual_seed(seed)
    raw = torch.rand((3, size, size), generator=generator, device=device)
    momentum = torch.zeros_like(raw)
    goal = DeviceTarget(target, device)
    covered = torch.zeros((height, width), dtype=torch.bool, device=device)
    covered[top:top + size, left:left + size] = True
    batch = image[None].expand(config.eot_samples, -1, -1, -1)
    printed = pool_patch if config.pool else torch.clone
    losses, hits = [], []
    with deterministic_convolutions(), attack_precision(config.precision, device):
        for step in range(config.steps):
            loss, raw, momentum = _mim_step(twin, batch, raw, momentum, goal.goal, top, left, config, generator)
            with torch.no_grad():
                nominal, _ = paste(image[None], printed(raw), top, left)
                hit, pixels = goal.counts(twin.logits(nominal).argmax(1), covered)
            losses.append(loss)
            hits.append(hit)
            if progress is None and config.stop_at_success is None:
                continue  # no host copy at this step
            success = rates(hit, pixels)[0]
            if progress is not None:
                progress(step, float(loss), success)
            if config.stop_at_success is not None and success >= config.stop_at_success:
                break
    with torch.no_grad():
        patch = printed(raw).cpu().numpy()
    return AttackResult(patch=patch, top=top, left=left, losses=torch.stack(losses).cpu().tolist(),
                        successes=rates(torch.cat(hits), pixels.expand(len(hits))), steps=len(losses))


def _mim_step(twin: Twin, batch: torch.Tensor, raw: torch.Tensor, momentum: torch.Tensor, goal: torch.Tensor,
              top: int, left: int, config: AttackConfig,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One momentum step over one batch of EOT draws: (loss, new raw patch, new momentum), all on the device."""
    raw = raw.detach().requires_grad_(True)
    patched, _ = apply_patch_eot(batch, pool_patch(raw) if config.pool else raw, top, left, config.eot, generator)
    loss = target_loss(twin.logits(patched), goal.expand(len(patched), -1, -1), config.skip_flipped)
    (grad,) = torch.autograd.grad(loss, raw)
    with torch.no_grad():
        momentum = config.momentum * momentum + grad / grad.abs().sum().clamp(min=1e-12)
        raw = (raw - config.step_size * momentum.sign()).clamp(0.0, 1.0)
    return loss.detach(), raw, momentum


def _image_on(image: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    image = torch.as_tensor(image, dtype=torch.float32, device=device)
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
    return image


@dataclass
class TrialMetrics:
    """What one attack did, under the nominal placement and across the EOT distribution."""

    success: float  # share of the target region outside the patch showing what was wanted (the headline)
    success_with_patch: float  # the same share counting the pixels under the patch too
    intended_flipped: int  # target-region pixels outside the patch that changed and now show what was wanted
    intended_share: float  # intended_flipped / target pixels outside the patch that did not show it before
    flipped_outside: int  # pixels outside target region and patch whose label changed
    changed: int  # all pixels outside the patch whose label changed
    patch_area: int
    area_of_effect: float  # changed / patch_area
    flip_distance_mean: float  # distance of changed pixels from the patch centre (px); nan if none
    flip_distance_max: float
    eot_success_mean: float  # success (outside the drawn patch) over `eot_draws` random EOT placements
    eot_success_min: float
    eot_draws: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@torch.no_grad()
def measure_trial(twin: Twin, image: np.ndarray | torch.Tensor, patch: np.ndarray, top: int, left: int,
                  target: Target, eot: EOTConfig = EOTConfig(), eot_draws: int = 16, seed: int = 1,
                  batch: int = EOT_EVAL_BATCH) -> TrialMetrics:
    """The trial's measurements on the twin's device: nominal placement, then `eot_draws` EOT draws (drawn at
    once from a generator there seeded with `seed`, so they do not depend on `batch`), run through the twin
    `batch` at a time to bound memory."""
    device = model_device(twin)
    image = _image_on(image, device)
    patch_t = torch.as_tensor(patch, dtype=torch.float32, device=device)
    clean = twin.labels(image[None])[0].cpu().numpy()
    patched, patch_mask = paste(image[None], patch_t, top, left)
    attacked = twin.labels(patched)[0].cpu().numpy()
    patch_mask = patch_mask.cpu().numpy()
    region = target.region
    changed = (attacked != clean) & ~patch_mask
    intended = region & changed & achieved(attacked, target)
    to_flip = region & ~patch_mask & ~achieved(clean, target)
    size = patch.shape[-1]
    rows, cols = np.nonzero(changed)
    centre = (top + (size - 1) / 2.0, left + (size - 1) / 2.0)
    distances = np.hypot(rows - centre[0], cols - centre[1])
    draws = [d for d in eot_successes(twin, image, patch_t, top, left, target, eot, eot_draws, seed, batch)
             if not np.isnan(d)]
    return TrialMetrics(
        success=success_rate(attacked, target, exclude=patch_mask), success_with_patch=success_rate(attacked, target),
        intended_flipped=int(intended.sum()),
        intended_share=float(intended.sum()) / to_flip.sum() if to_flip.any() else float("nan"),
        flipped_outside=int((changed & ~region).sum()), changed=int(changed.sum()), patch_area=size * size,
        area_of_effect=float(changed.sum()) / (size * size),
        flip_distance_mean=float(distances.mean()) if distances.size else float("nan"),
        flip_distance_max=float(distances.max()) if distances.size else float("nan"),
        eot_success_mean=float(np.mean(draws)) if draws else float("nan"),
        eot_success_min=float(np.min(draws)) if draws else float("nan"), eot_draws=eot_draws)


@torch.no_grad()
def eot_successes(twin: Twin, image: torch.Tensor, patch: torch.Tensor, top: int, left: int, target: Target,
                  eot: EOTConfig, count: int, seed: int, batch: int = EOT_EVAL_BATCH) -> list[float]:
    """Success (outside the drawn patch, coverage > 1/2) under each of `count` EOT draws; image and patch on
    the twin's device."""
    if batch < 1:
        raise ValueError(f"EOT evaluation batch must be >= 1, got {batch}")
    if count == 0:
        return []
    generator = torch.Generator(device=image.device).manual_seed(seed)
    drawn = draw_eot(count, patch.shape[-1], eot, generator)
    goal = DeviceTarget(target, image.device)
    hits, pixels = [], []
    for start in range(0, count, batch):
        chunk = drawn[start:start + batch]
        varied, masks = place_patch(image[None].expand(len(chunk), -1, -1, -1), patch, top, left, eot, chunk)
        hit, total = goal.counts(twin.logits(varied).argmax(1), masks[:, 0] > 0.5)
        hits.append(hit)
        pixels.append(total)
    return rates(torch.cat(hits), torch.cat(pixels))
