"""Ladder-style DenseNet-121 (seed 001, Krešo et al.): DenseNet-121 features at strides 4, 8, 16 and 32;
an upsampling path that blends each coarser representation with the next finer one by a single 3x3
convolution, giving 4x-subsampled logits that are bilinearly upsampled to the input size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import densenet121


def bn_relu_conv(in_channels: int, out_channels: int, kernel: int) -> nn.Sequential:
    # DenseNet's pre-activation order, so the blend sees normalised features from both levels.
    return nn.Sequential(
        nn.BatchNorm2d(in_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
    )


class LadderBlend(nn.Module):
    """Upsample the coarse tensor to the skip's size, concatenate the projected skip, blend with one 3x3 conv."""

    def __init__(self, skip_channels: int, channels: int):
        super().__init__()
        self.project = bn_relu_conv(skip_channels, channels, 1)
        self.blend = bn_relu_conv(2 * channels, channels, 3)

    def forward(self, coarse: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(coarse, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.blend(torch.cat([up, self.project(skip)], dim=1))


class LadderDenseNet(nn.Module):
    def __init__(self, num_classes: int, channels: int = 128):
        super().__init__()
        f = densenet121(weights=None).features
        # stride 4 -> block1 (256 ch), stride 8 -> block2 (512), stride 16 -> block3 (1024), stride 32 -> block4 (1024)
        self.stem = nn.Sequential(f.conv0, f.norm0, f.relu0, f.pool0)
        self.block1 = f.denseblock1
        self.block2 = nn.Sequential(f.transition1, f.denseblock2)
        self.block3 = nn.Sequential(f.transition2, f.denseblock3)
        self.block4 = nn.Sequential(f.transition3, f.denseblock4, f.norm5, nn.ReLU(inplace=True))
        self.context = nn.Conv2d(1024, channels, 1, bias=False)
        self.up16 = LadderBlend(1024, channels)
        self.up8 = LadderBlend(512, channels)
        self.up4 = LadderBlend(256, channels)
        self.classifier = bn_relu_conv(channels, num_classes, 1)
        self.classifier[2].bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        s4 = self.block1(self.stem(x))
        s8 = self.block2(s4)
        s16 = self.block3(s8)
        y = self.context(self.block4(s16))
        y = self.up4(self.up8(self.up16(y, s16), s8), s4)
        logits4 = self.classifier(y)  # the 4x-subsampled prediction
        return F.interpolate(logits4, size=size, mode="bilinear", align_corners=False)


def ladder_densenet121(num_classes: int) -> nn.Module:
    return LadderDenseNet(num_classes)


from segmenters.models import register  # noqa: E402

register("ladder_densenet121")(ladder_densenet121)
