"""Twins on disk: a checkpoint is the weights plus the `ModelSpec` that says what they mean."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
