"""`ImportedNetwork`: a foreign network behind the zoo's contract (normalised RGB NCHW in, logits at the input size
out), so that every twin, attack and engine downstream treats it like a zoo model.

The adapter does only what the sidecar says: swap RGB to BGR, resize to a fixed input size, move channels last;
then pick the segmentation output, move its channels first, turn it into logits, and bring it back to the input
size. Normalisation itself stays where it is for every twin, in `ModelSpec.normalization`. Everything here is
differentiable, so patch attacks reach the pixels through it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segmenters.importing.spec import ImportSpec

#: probabilities are clipped this far from 0 and 1 before their log: a saturated pixel keeps a finite logit
PROBABILITY_FLOOR = 1e-6


class ImportedNetwork(nn.Module):
    """`network` wrapped to the zoo's contract by `spec`; `output_index` is the resolved position of its output."""

    def __init__(self, network: nn.Module, spec: ImportSpec, output_index: int, output_kind: str | None = None,
                 batch_of_one: bool = False):
        super().__init__()
        self.network = network
        self.batch_of_one = batch_of_one  # the graph's batch axis is fixed at 1: images go through one at a time
        self.channel_order, self.layout = spec.input.channel_order, spec.input.layout
        self.fixed_size = tuple(spec.input.size) if spec.input.fixed_size else None
        self.output_key = spec.output.name
        self.output_index = output_index
        self.output_layout = spec.output.layout
        self.output_kind = output_kind or spec.output.kind
        self.num_classes = len(spec.classes)

    def train(self, mode: bool = True) -> ImportedNetwork:
        self.training = mode
        try:
            self.network.train(mode)
        except NotImplementedError:  # a torch.export program keeps the mode it was exported in
            pass
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = images.shape[-2:]
        inputs = self._network_input(images)
        if self.batch_of_one and inputs.shape[0] != 1:
            return torch.cat([self.forward(image[None]) for image in images])
        output = self._select(self.network(inputs))
        if output.dim() != 4:
            raise ValueError(f"the segmentation output must be 4-D, got shape {tuple(output.shape)}")
        if self.output_layout == "nhwc":
            output = output.permute(0, 3, 1, 2)
        logits = self._logits(output)
        if logits.shape[-2:] != size:  # the network predicts at a lower (or fixed) resolution: bilinear on logits
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
        return logits

    def _network_input(self, images: torch.Tensor) -> torch.Tensor:
        if self.channel_order == "bgr":
            images = images.flip(1)
        if self.fixed_size is not None and tuple(images.shape[-2:]) != self.fixed_size:
            images = F.interpolate(images, size=self.fixed_size, mode="bilinear", align_corners=False)
        if self.layout == "nhwc":
            images = images.permute(0, 2, 3, 1)
        return images.contiguous()

    def _select(self, outputs) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return outputs
        if isinstance(outputs, Mapping):  # torchvision's segmentation models: {"out": ..., "aux": ...}
            if self.output_key is not None and self.output_key in outputs:
                return outputs[self.output_key]
            return list(outputs.values())[self.output_index]
        if isinstance(outputs, Sequence):
            return outputs[self.output_index]
        raise TypeError(f"the network returned {type(outputs).__name__}, not tensors")

    def _logits(self, output: torch.Tensor) -> torch.Tensor:
        if self.output_kind == "logits":
            return output
        if self.output_kind == "probabilities":
            return output.clamp_min(PROBABILITY_FLOOR).log()
        if self.output_kind == "foreground_probability":
            p = output.clamp(PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR)
            output = p.log() - (-p).log1p()
        # one foreground logit x: softmax([-x/2, x/2]) is (1 - sigmoid(x), sigmoid(x)), the network's own two
        # classes; split evenly, so each class's score moves with the input and can be attributed (VGatt)
        half = output / 2
        return torch.cat([-half, half], dim=1)
