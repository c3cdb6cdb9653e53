"""CIFAR ResNets (He et al., CVPR 2016, Sec. 4.2): a 3×3 stem, three stages of 16/32/64 channels with n
BasicBlocks each (depth 6n + 2), and the parameter-free shortcut of option A (subsample, zero-pad channels). The
blocks end with attnkit.surgery.gating.residual_end, as the ImageNet ResNets' (resnet.py)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..surgery.gating import residual_end
from .layers import GlobalAvgPool


class PadShortcut(nn.Module):
    """Option A: take every other pixel and zero-pad the new channels; no parameters."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.pad = cout - cin

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class CifarBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = PadShortcut(cin, cout) if stride != 1 or cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return residual_end(self.bn2, self.conv2(out), identity, self.relu)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, in_chans: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 (20, 32, 44, 56, 110), got {depth}.")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        cin = 16
        for i, cout in enumerate((16, 32, 64)):
            blocks = [CifarBasicBlock(cin if j == 0 else cout, cout, 2 if i and j == 0 else 1) for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = cout
        self.avgpool = GlobalAvgPool()
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))
