"""SEMEDA (thesis chapter 3): match predicted and ground-truth masks in the embeddings of a small network
trained to detect semantic edges from masks.

* `SemedaNet` is g_phi: 3 layers, 16 -> 32 -> 2 channels, ReLU, softmax on the last (section 3.4.1).
* `pretrain_semeda_net` is the first half of Algorithm 3.1: PPCE between g_phi(S*) and the edge maps E*.
* `embedding_match` is Eq. 3.5-3.6: sum_l lambda_l * || psi_l(S_hat) - psi_l(S*) ||_1 (mean-normalised).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from segmenters.edges import semantic_edge_map


class SemedaNet(nn.Module):
    def __init__(self, num_classes: int, channels: tuple[int, int] = (16, 32), kernel_size: int = 3):
        super().__init__()
        pad = kernel_size // 2
        self.layers = nn.ModuleList(
            [
                nn.Conv2d(num_classes, channels[0], kernel_size, padding=pad),
                nn.Conv2d(channels[0], channels[1], kernel_size, padding=pad),
                nn.Conv2d(channels[1], 2, kernel_size, padding=pad),
            ]
        )
        self.num_classes = num_classes

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) class-probability masks -> (N, 2, H, W) edge logits."""
        x = masks.contiguous(memory_format=torch.channels_last)
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)

    def embeddings(self, masks: torch.Tensor, layers: int | None = None) -> list[torch.Tensor]:
        """psi_1..psi_layers (all L by default): each layer's ReLU output, then the softmax edge map.

        Channels-last: oneDNN's 3x3 convolutions over these few channels (12 -> 16 -> 32) run about twice as fast
        on the CPU in that layout as in NCHW, and this network costs a SEMEDA step more than the segmenter does.
        """
        layers = len(self.layers) if layers is None else layers
        out = []
        x = masks.contiguous(memory_format=torch.channels_last)
        for index, layer in enumerate(self.layers[:layers]):
            x = layer(x)
            x = x.softmax(dim=1) if index == len(self.layers) - 1 else F.relu(x)
            out.append(x)
        return out


def one_hot_masks(labels: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """(N, H, W) labels -> (N, C, H, W) one-hot; ignored pixels get all zeros."""
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    onehot = F.one_hot(safe, num_classes).permute(0, 3, 1, 2).to(torch.float32)
    return onehot * valid[:, None]


def pretrain_semeda_net(
    label_batches: Iterable[torch.Tensor],
    steps: int,
    num_classes: int,
    ignore_index: int = 255,
    lr: float = 1e-2,
    seed: int = 0,
    progress: bool = True,
    device: torch.device | str = "cpu",
) -> tuple[SemedaNet, dict[str, float]]:
    """Train g_phi on ground-truth masks to predict their edge maps (Eq. 3.8), on `device`.

    Takes `steps` batches from `label_batches` (cycled if shorter; moved to `device`). Returns the network (on
    `device`; its initial weights do not depend on it) and its edge-detection figures over the last tenth of the
    steps (pixel accuracy, edge F1).
    """
    if steps < 1:
        raise ValueError(f"SEMEDA pretraining needs at least one step, got {steps}")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    net = SemedaNet(num_classes).to(device)
    torch.random.set_rng_state(generator_state)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    tp = fp = fn = correct = total = 0
    stream = itertools.cycle(label_batches) if isinstance(label_batches, (list, tuple)) else iter(label_batches)
    for step in tqdm(range(steps), desc="pretrain SEMEDA net", disable=not progress):
        labels = next(stream).to(device, non_blocking=True)
        edges = semantic_edge_map(labels, ignore_index)
        logits = net(one_hot_masks(labels, num_classes, ignore_index))
        loss = F.cross_entropy(logits, edges, ignore_index=ignore_index)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= steps - max(1, steps // 10):
            valid = edges != ignore_index
            pred = logits.argmax(1)
            tp += int(((pred == 1) & (edges == 1) & valid).sum())
            fp += int(((pred == 1) & (edges == 0) & valid).sum())
            fn += int(((pred == 0) & (edges == 1) & valid).sum())
            correct += int(((pred == edges) & valid).sum())
            total += int(valid.sum())
    net.requires_grad_(False).eval()
    figures = {"pixel_accuracy": correct / max(total, 1), "edge_f1": 2 * tp / max(2 * tp + fp + fn, 1)}
    return net, figures


_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def sobel_embeddings(masks: torch.Tensor, layers: int | None = None) -> list[torch.Tensor]:
    """The Sobel baseline (section 3.4.2): Sobel kernels on each class channel independently (one layer)."""
    if layers == 0:
        return []
    c = masks.shape[1]
    kernel = torch.stack([_SOBEL_X, _SOBEL_X.T]).to(masks)[:, None]  # (2, 1, 3, 3)
    weight = kernel.repeat(c, 1, 1, 1)  # depthwise: x and y gradient per class
    return [F.conv2d(_replicate_border(masks), weight, groups=c)]


def _replicate_border(masks: torch.Tensor) -> torch.Tensor:
    """F.pad(masks, (1, 1, 1, 1), mode="replicate") by concatenation: inductor (torch 2.14) gets the strides of
    replication padding's backward wrong and the compiled loss fails in backward."""
    rows = torch.cat([masks[..., :1, :], masks, masks[..., -1:, :]], dim=-2)
    return torch.cat([rows[..., :1], rows, rows[..., -1:]], dim=-1)


def embedding_match(
    embed: Callable[[torch.Tensor, int], list[torch.Tensor]],
    probs: torch.Tensor,
    labels: torch.Tensor,
    lambdas: tuple[float, ...],
    ignore_index: int = 255,
) -> list[torch.Tensor]:
    """lambda_l * mean |psi_l(S_hat) - psi_l(S*)| for each layer l, over non-ignored pixels.

    S* is the one-hot ground truth; at ignored pixels it is filled with the (detached) prediction, so that
    void regions create no artificial edges in S* and contribute nothing themselves. `embed(masks, layers)` returns
    the first `layers` embeddings: layers after the last nonzero lambda are not computed (their terms are zero
    either way; (4, 2, 0) skips g_phi's last convolution, forward and backward).
    """
    num_classes = probs.shape[1]
    valid = (labels != ignore_index)[:, None]
    target = one_hot_masks(labels, num_classes, ignore_index)
    target = torch.where(valid, target, probs.detach())
    layers = max((index + 1 for index, lam in enumerate(lambdas) if lam != 0.0), default=0)
    predicted = embed(probs, layers)
    with torch.no_grad():
        expected = embed(target, layers)
    weight = valid.to(probs.dtype)
    denominator = weight.sum().clamp_min(1.0)
    terms = []
    for lam, psi_hat, psi_star in zip(lambdas, predicted, expected):
        diff = (psi_hat - psi_star).abs().mean(dim=1, keepdim=True)  # mean over the layer's channels
        terms.append(lam * (diff * weight).sum() / denominator)
    return terms + [probs.new_zeros(()) for _ in lambdas[layers:]]
