"""DeepLabV3 on ResNet-18 (seed 000's Cityscapes model) and torchvision's MobileNetV3-Large models."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large, lraspp_mobilenet_v3_large
from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3

from segmenters.models import register


class TorchvisionSegmenter(nn.Module):
    """torchvision's segmentation models return {"out": logits}; the zoo's contract is a plain tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def _dilate_basic_layer(layer: nn.Sequential, previous_dilation: int) -> int:
    """Trade a ResNet stage's stride 2 for dilation, the rule torchvision's `replace_stride_with_dilation`
    applies to Bottleneck (BasicBlock refuses it): the first block keeps the previous dilation, the rest
    use twice that."""
    dilation = previous_dilation * 2
    for index, block in enumerate(layer):
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)
        block.conv1.stride = (1, 1)
        first = previous_dilation if index == 0 else dilation
        block.conv1.dilation, block.conv1.padding = (first, first), (first, first)
        block.conv2.dilation, block.conv2.padding = (dilation, dilation), (dilation, dilation)
    return dilation


@register("deeplabv3_resnet18")
def deeplabv3_resnet18(num_classes: int) -> nn.Module:
    # torchvision has no ResNet-18 DeepLabV3 builder; assemble it as its _deeplabv3_resnet does:
    # dilation in the last two stages (output stride 8), the ASPP head on the 512-channel layer4.
    backbone = resnet18(weights=None)
    dilation = 1
    for layer in (backbone.layer3, backbone.layer4):
        dilation = _dilate_basic_layer(layer, dilation)
    backbone = IntermediateLayerGetter(backbone, return_layers={"layer4": "out"})
    return TorchvisionSegmenter(DeepLabV3(backbone, DeepLabHead(512, num_classes), aux_classifier=None))


@register("lraspp_mobilenetv3")
def lraspp_mobilenetv3(num_classes: int) -> nn.Module:
    # LR-ASPP with 128 filters in the segmentation head, as in seed 000.
    return TorchvisionSegmenter(
        lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes, inter_channels=128)
    )


@register("deeplabv3_mobilenetv3")
def deeplabv3_mobilenetv3(num_classes: int) -> nn.Module:
    return TorchvisionSegmenter(
        deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
    )
