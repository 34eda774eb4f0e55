"""The U-Net of seed 000: convolution blocks of 8, 16, 32, 64 channels, strided-convolution downscaling,
transposed-convolution upscaling, skip connections by concatenation (Ronneberger et al. 2015)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segmenters.models import register


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def strided_down(channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, out_channels, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    def __init__(self, num_classes: int, channels: tuple[int, ...] = (8, 16, 32, 64), in_channels: int = 3):
        super().__init__()
        self.depth = len(channels) - 1
        self.stem = conv_block(in_channels, channels[0])
        self.downs = nn.ModuleList(strided_down(channels[i], channels[i + 1]) for i in range(self.depth))
        self.encoders = nn.ModuleList(conv_block(channels[i + 1], channels[i + 1]) for i in range(self.depth))
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(channels[i + 1], channels[i], 2, stride=2) for i in reversed(range(self.depth))
        )
        self.decoders = nn.ModuleList(conv_block(2 * channels[i], channels[i]) for i in reversed(range(self.depth)))
        self.classifier = nn.Conv2d(channels[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        multiple = 2**self.depth
        # Pad to a multiple of the total stride so every skip lines up; crop the logits back. The pad is
        # unconditional (zero-width when aligned) so exported graphs keep it for every input size.
        pad_h, pad_w = (-height) % multiple, (-width) % multiple
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        skips = [self.stem(x)]
        for down, encode in zip(self.downs, self.encoders):
            skips.append(encode(down(skips[-1])))
        y = skips.pop()
        for up, decode in zip(self.ups, self.decoders):
            y = decode(torch.cat([up(y), skips.pop()], dim=1))
        return self.classifier(y)[..., :height, :width]


@register("unet")
def unet(num_classes: int) -> nn.Module:
    return UNet(num_classes)
