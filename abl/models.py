"""Image classifiers with named taps.

Every model here starts with a :class:`Normalize` layer (so it takes images scaled to [0, 1], NCHW) and names its
taps: a mapping from a public tap name to a module path whose output it is (``"block2"``), or whose input it is
(``"fc:in"``). ``penultimate`` — the features entering the final linear layer — is always present; the detectors'
feature-space lens uses it. Export exposes every tap as a named ONNX output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``; buffers, so it is saved with the weights and exported in the graph."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """A small VGG-style CNN for 28x28 and 8x8 inputs (any size >= 4 works: pooling is adaptive at the end).

    Three conv blocks (the first two end in 2x2 max-pooling when the input is large enough), global average pooling,
    a 128-unit dense layer (the penultimate features) and the classifier.
    """

    TAPS = {"block1": "block1", "block2": "block2", "block3": "block3", "pool": "flatten",
            "penultimate": "fc:in"}

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 28,
                 width: int = 32, mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,)) -> None:
        super().__init__()
        pool = input_size >= 16
        self.normalize = Normalize(mean, std)
        self.block1 = nn.Sequential(_conv_bn(in_channels, width), nn.MaxPool2d(2) if pool else nn.Identity())
        self.block2 = nn.Sequential(_conv_bn(width, 2 * width), nn.MaxPool2d(2) if pool else nn.Identity())
        self.block3 = _conv_bn(2 * width, 4 * width)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(4 * width, 128)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.normalize(x))))
        return self.fc(self.act(self.fc1(self.flatten(self.avgpool(x)))))


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False)) if stride != 1 or cin != cout else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """PreAct-ResNet-18 for 32x32 inputs (He et al., 2016), the BackdoorBench default backbone."""

    TAPS = {"layer2": "layer2", "layer3": "layer3", "layer4": "layer4", "penultimate": "fc:in"}

    def __init__(self, in_channels: int = 3, num_classes: int = 10, input_size: int = 32,
                 mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,)) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        cin = 64
        layers = []
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(PreActBlock(cin, cout, stride), PreActBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn = nn.BatchNorm2d(512)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.normalize(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.avgpool(self.relu(self.bn(x)))))


class WideBasic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, drop: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        shortcut = self.shortcut(o) if self.shortcut is not None else x
        o = self.conv2(self.drop(F.relu(self.bn2(self.conv1(o)))))
        return o + shortcut


class WideResNet(nn.Module):
    """WRN-d-k (Zagoruyko & Komodakis, 2016); WRN-16-1 is ABL's model for CIFAR-10 and GTSRB."""

    TAPS = {"block1": "block1", "block2": "block2", "block3": "block3", "penultimate": "fc:in"}

    def __init__(self, in_channels: int = 3, num_classes: int = 10, input_size: int = 32, depth: int = 16,
                 widen: int = 1, drop: float = 0.0, mean: Sequence[float] = (0.5,),
                 std: Sequence[float] = (0.5,)) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError("WRN depth must be 6n + 4")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks = []
        cin = widths[0]
        for i, stride in enumerate((1, 2, 2)):
            layer = []
            for j in range(n):
                layer.append(WideBasic(cin, widths[i + 1], stride if j == 0 else 1, drop))
                cin = widths[i + 1]
            blocks.append(nn.Sequential(*layer))
        self.block1, self.block2, self.block3 = blocks
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(self.normalize(x)))))
        return self.fc(self.flatten(self.avgpool(self.relu(self.bn(x)))))


ARCHS = {
    "small-cnn": SmallCNN,
    "preact-resnet18": PreActResNet18,
    "wrn-16-1": lambda **kw: WideResNet(depth=16, widen=1, **kw),
}


def build_model(arch: str, in_channels: int, num_classes: int, input_size: int,
                mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """Build one of :data:`ARCHS` with the dataset's normalisation baked in."""
    try:
        factory = ARCHS[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(ARCHS)}") from None
    return factory(in_channels=in_channels, num_classes=num_classes, input_size=input_size, mean=mean, std=std)


def model_taps(model: nn.Module) -> dict[str, str]:
    """The model's declared taps (public name -> module spec)."""
    taps = getattr(model, "TAPS", None)
    if not taps:
        raise ValueError(f"{type(model).__name__} declares no taps; pass them explicitly")
    return dict(taps)
