"""Segmentation losses: per-pixel cross entropy (PPCE), the Sobel baseline and SEMEDA (thesis chapter 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segmenters.losses.semeda import SemedaNet, embedding_match, sobel_embeddings

LOSSES = ("ppce", "sobel", "semeda")
# Table 3.1's best settings: SEMEDA (4, 2, 0) on Cityscapes, the Sobel baseline lambda_1 = 4.
DEFAULT_LAMBDAS = {"ppce": (), "sobel": (4.0,), "semeda": (4.0, 2.0, 0.0)}


def ppce_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Eq. 3.3, averaged over the pixels that are not ignored."""
    return F.cross_entropy(logits, labels, ignore_index=ignore_index)


class SegmentationLoss(nn.Module):
    """Eq. 3.7: PPCE plus, for "semeda"/"sobel", the embedding-matching term (Eq. 3.5-3.6).

    Returns the total and its parts (detached 0-d tensors on the logits' device, so that a training step does not
    wait for the device; read them with float() when logging), so training logs show what each term does.
    """

    def __init__(
        self,
        kind: str,
        num_classes: int,
        ignore_index: int = 255,
        lambdas: tuple[float, ...] | None = None,
        semeda_net: SemedaNet | None = None,
    ):
        super().__init__()
        if kind not in LOSSES:
            raise ValueError(f"unknown loss {kind!r}; expected one of {LOSSES}")
        lambdas = DEFAULT_LAMBDAS[kind] if lambdas is None else tuple(lambdas)
        if kind == "semeda" and semeda_net is None:
            raise ValueError("the SEMEDA loss needs a pretrained SEMEDA network (see pretrain_semeda_net)")
        expected = {"ppce": 0, "sobel": 1, "semeda": 3}[kind]
        if kind != "ppce" and len(lambdas) != expected:
            raise ValueError(f"loss {kind!r} takes {expected} lambda weight(s), got {lambdas}")
        self.kind, self.num_classes, self.ignore_index = kind, num_classes, ignore_index
        self.lambdas = tuple(float(v) for v in lambdas)
        self.semeda_net = semeda_net
        if semeda_net is not None:
            semeda_net.requires_grad_(False).eval()  # g_phi* is frozen while f_theta trains

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ppce = ppce_loss(logits, labels, self.ignore_index)
        parts = {"ppce": ppce.detach()}
        if self.kind == "ppce":
            return ppce, parts
        probs = logits.softmax(dim=1)
        embed = self.semeda_net.embeddings if self.kind == "semeda" else sobel_embeddings
        terms = embedding_match(embed, probs, labels, self.lambdas, self.ignore_index)
        for index, term in enumerate(terms):
            parts[f"{self.kind}_l{index + 1}"] = term.detach()
        extra = torch.stack(terms).sum()
        parts[self.kind] = extra.detach()
        return ppce + extra, parts
