"""ResNet-style classifiers defined in the project (no torchvision).

Two sizes: :func:`demo_resnet` (small, trains on the 64x64 demo data in minutes on two
CPU cores) and :func:`resnet18_like` (ResNet-18 widths and depths, for 224x224 timing).
Module names (``stem``, ``layer1`` ... ``layerN``, ``avgpool``, ``fc``) are the layer
names the explanation methods refer to.
"""
from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection.

    Input (N, C_in, H, W) -> output (N, C_out, H / stride, W / stride).
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A ResNet: stem, stages ``layer1..layerN``, global average pool, linear head.

    Args:
        num_classes: number of output logits.
        in_channels: 1 (grayscale) or 3 (RGB).
        widths: channels per stage; stage i > 1 halves the spatial size.
        blocks: residual blocks per stage.
        stem: "small" (3x3 conv, stride 2) or "imagenet" (7x7 conv stride 2 + max pool).

    Input (N, in_channels, H, W) float32 -> logits (N, num_classes).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        widths: tuple[int, ...] = (16, 32, 64),
        blocks: tuple[int, ...] = (1, 1, 1),
        stem: str = "small",
    ) -> None:
        super().__init__()
        if len(widths) != len(blocks):
            raise ValueError("widths and blocks must have the same length")
        if stem == "small":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, widths[0], 3, 2, 1, bias=False),
                nn.BatchNorm2d(widths[0]),
                nn.ReLU(),
            )
        elif stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False),
                nn.BatchNorm2d(widths[0]),
                nn.ReLU(),
                nn.MaxPool2d(3, 2, 1),
            )
        else:
            raise ValueError(f"unknown stem {stem!r}")
        c_in = widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks), start=1):
            stride = 1 if i == 1 else 2
            stage = [BasicBlock(c_in, width, stride)]
            stage += [BasicBlock(width, width, 1) for _ in range(n - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*stage))
            c_in = width
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def demo_resnet(num_classes: int, in_channels: int = 3) -> ResNet:
    """The default demo network: 3 stages (16, 32, 64 channels), one block each."""
    return ResNet(num_classes, in_channels, widths=(16, 32, 64), blocks=(1, 1, 1))


def resnet18_like(num_classes: int, in_channels: int = 3) -> ResNet:
    """ResNet-18 layout (64-512 channels, 2 blocks per stage, ImageNet stem)."""
    return ResNet(num_classes, in_channels, (64, 128, 256, 512), (2, 2, 2, 2), "imagenet")


ARCHITECTURES = {"demo_resnet": demo_resnet, "resnet18_like": resnet18_like}
