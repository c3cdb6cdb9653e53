"""LeNet-5 style network (LeCun et al., "Gradient-Based Learning Applied to Document Recognition", 1998), as in
the classic MNIST examples: two 5×5 conv stages (6 and 16 channels, ReLU, 2×2 max pooling), then 120-84-classes."""
from __future__ import annotations

from torch import Tensor, nn


class LeNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_chans: int = 1, input_size: int = 28) -> None:
        super().__init__()
        if input_size not in (28, 32):
            raise ValueError(f"lenet takes 28×28 or 32×32 inputs (input_size=28 or 32), got input_size={input_size}.")
        self.conv1 = nn.Conv2d(in_chans, 6, 5, padding=2 if input_size == 28 else 0)
        self.relu1 = nn.ReLU(inplace=True)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.relu2 = nn.ReLU(inplace=True)
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)
        self.relu = nn.ReLU(inplace=True)

    def attention_sites(self, placement: str) -> list[tuple]:
        """(site, holder, channels, stage[, replaced]) for attach(): gates after each conv stage's activation,
        before pooling; SK in place of conv1 where its padding keeps the size (28×28 inputs); GCT on the input of
        each convolution."""
        if placement == "conv":
            return [("conv1", "", 6, 1, ("conv1",))] if self.conv1.padding == (2, 2) else []
        if placement == "before_conv":
            return [("conv1", "", self.conv1.in_channels, 1), ("conv2", "", 6, 2)]
        return [("relu1", "", 6, 1), ("relu2", "", 16, 2)]

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu(self.fc1(x.flatten(1)))
        return self.fc3(self.relu(self.fc2(x)))
