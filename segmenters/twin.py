"""Twins on disk: a checkpoint is the weights plus the `ModelSpec` that says what they mean."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from segmenters.files import atomic_write
from segmenters.models import build_model
from segmenters.spec import ModelSpec, state_dict_digest


@dataclass
class Twin:
    """A trained PyTorch model with its spec; images go in as [0, 1] RGB, normalisation is the spec's."""

    model: nn.Module
    spec: ModelSpec

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) float images in the spec's value range -> (N, C, H, W) logits."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (N, 3, H, W) images, got shape {tuple(images.shape)}")
        return self.model(self.spec.normalization.normalize(images))

    @torch.no_grad()
    def labels(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(images).argmax(dim=1)


def atomic_save(obj: dict, path: str | Path) -> None:
    """torch.save through a temporary file: a killed run never leaves half a checkpoint."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_twin(path: str | Path, model: nn.Module, spec: ModelSpec, **extra) -> ModelSpec:
    """Save weights + spec (with the weights' digest filled in); `extra` holds resumable training state."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    spec = spec.with_updates(checkpoint_digest=state_dict_digest(state))
    atomic_save({"spec": spec.to_json(), "model": state, **extra}, path)
    return spec


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(checkpoint, dict) or "spec" not in checkpoint or "model" not in checkpoint:
        raise ValueError(f"{path} is not a patchwatch checkpoint (no embedded ModelSpec)")
    return checkpoint


def load_twin(path: str | Path, map_location: str | torch.device = "cpu") -> Twin:
    """Rebuild the model named by the embedded spec (or embedded by an import), load its weights, check their digest, eval mode."""
    checkpoint = read_checkpoint(path)
    spec = ModelSpec.from_json(checkpoint["spec"])
    digest = state_dict_digest(checkpoint["model"])
    if spec.checkpoint_digest and spec.checkpoint_digest != digest:
        raise ValueError(f"checkpoint {path}: weights do not match the digest recorded in its spec")
    if "imported" in checkpoint:  # a network from a user's file: rebuilt from what the checkpoint embeds
        from segmenters.importing.sources import rebuild_network

        model, _ = rebuild_network(checkpoint["imported"])
    else:
        model = build_model(spec.arch, spec.num_classes)
    model.load_state_dict(checkpoint["model"])
    return Twin(model=model.to(map_location).eval(), spec=spec)


#: a twin whose most predicted class takes more than this share of all the pixels it labelled, over a set of
#: images, is reported as predicting one class for (nearly) everything (issue 20: a CamVid twin whose batch-norm
#: statistics lagged its weights said "Building" for every pixel, and nothing said so)
ONE_CLASS_SHARE = 0.95


@dataclass(frozen=True)
class TwinHealth:
    """How a twin's predicted labels spread over its classes on a set of images: the one-class check."""

    class_names: tuple[str, ...]
    #: pixels the twin labelled with each class, in class order
    pixel_counts: tuple[int, ...]
    images: int
    threshold: float = ONE_CLASS_SHARE

    @classmethod
    def from_counts(cls, counts, class_names, images: int, threshold: float = ONE_CLASS_SHARE) -> TwinHealth:
        counts = tuple(int(c) for c in counts)
        if len(counts) != len(class_names):
            raise ValueError(f"{len(counts)} pixel counts for {len(class_names)} classes")
        return cls(tuple(class_names), counts, images, threshold)

    @property
    def pixels(self) -> int:
        return sum(self.pixel_counts)

    @property
    def dominant_class(self) -> str:
        return self.class_names[max(range(len(self.pixel_counts)), key=self.pixel_counts.__getitem__)]

    @property
    def dominant_share(self) -> float:
        return max(self.pixel_counts) / self.pixels if self.pixels else 0.0

    @property
    def one_class(self) -> bool:
        return self.pixels > 0 and self.dominant_share > self.threshold

    def message(self) -> str | None:
        """What is wrong and its likely cause, or None for a twin that predicts more than one class."""
        if not self.one_class:
            return None
        name = self.dominant_class
        return (f"the twin predicts {name!r} for {self.dominant_share:.1%} of the {self.pixels:,} pixels of "
                f"{self.images} image(s) (more than {self.threshold:.0%}): it has most likely collapsed to one "
                "class. Likely causes: batch-norm running statistics that do not match its weights (a checkpoint "
                "saved without recalibrating them; `patchwatch train` recomputes them from training batches "
                "before every evaluation and save) or too short a training run (train longer). If these images "
                f"really are almost all {name!r}, ignore this.")

    def as_dict(self) -> dict:
        return {"one_class": self.one_class, "dominant_class": self.dominant_class,
                "dominant_share": round(self.dominant_share, 6), "threshold": self.threshold, "images": self.images,
                "pixels": self.pixels, "class_shares": {name: round(count / max(self.pixels, 1), 6)
                                                        for name, count in zip(self.class_names, self.pixel_counts)},
                "warning": self.message()}


def predicted_pixel_counts(labels: torch.Tensor | np.ndarray, num_classes: int) -> torch.Tensor:
    """Pixels of a label map (any shape; torch on any device, or numpy) given to each of `num_classes` classes, on
    the CPU: what `TwinHealth.from_counts` adds up over batches."""
    labels = torch.as_tensor(labels).reshape(-1).long()
    return torch.bincount(labels, minlength=num_classes)[:num_classes].cpu()


@torch.no_grad()
def twin_health(twin: Twin, batches, threshold: float = ONE_CLASS_SHARE) -> TwinHealth:
    """The one-class check of `twin` (eval mode) over `batches` of (N, 3, H, W) [0, 1] images on its device."""
    twin.model.eval()
    counts, images = torch.zeros(twin.spec.num_classes, dtype=torch.int64), 0
    for batch in batches:
        counts += predicted_pixel_counts(twin.labels(batch), twin.spec.num_classes)
        images += len(batch)
    return TwinHealth.from_counts(counts, twin.spec.class_names, images, threshold)


def warn_if_one_class(health: TwinHealth, where: str) -> str | None:
    """Print a WARNING line on stderr when the twin predicts one class for (nearly) everything; the message (for the
    caller's JSON) or None. Never raises: a collapsed twin is reported, not refused."""
    return print_warning(health.message(), where)


def print_warning(message: str | None, where: str) -> str | None:
    """`WARNING: <where>: <message>` on stderr (nothing for None); returns `message`."""
    if message is not None:
        print(f"WARNING: {where}: {message}", file=sys.stderr, flush=True)
    return message
