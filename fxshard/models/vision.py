"""Vision and MLP models of the zoo: MLP, ResNet-50-like, U-Net, Inception-v3-like."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fxshard.errors import ZooError

__all__ = ["MLP", "MLPConfig", "ResNet", "ResNetConfig", "UNet", "UNetConfig", "Inception", "InceptionConfig"]


@dataclass(frozen=True, kw_only=True)
class MLPConfig:
    """Shape of :class:`MLP`: ``n_layers`` Linear layers with GELU in between."""

    in_features: int = 1024
    hidden: int = 1024
    out_features: int = 1024
    n_layers: int = 8

    def __post_init__(self) -> None:
        if self.n_layers < 1:
            raise ZooError(f"MLPConfig.n_layers={self.n_layers}; use at least 1")


class MLP(nn.Sequential):
    """A plain stack of Linear + GELU layers; input ``(B, in_features)``."""

    def __init__(self, config: MLPConfig | None = None) -> None:
        cfg = config or MLPConfig()
        widths = [cfg.in_features] + [cfg.hidden] * (cfg.n_layers - 1) + [cfg.out_features]
        layers: list[nn.Module] = [nn.Linear(widths[0], widths[1])]
        for c_in, c_out in zip(widths[1:-1], widths[2:]):
            layers += [nn.GELU(), nn.Linear(c_in, c_out)]
        super().__init__(*layers)
        self.config = cfg


def _cbr(c_in: int, c_out: int, k: int = 3, *, stride: int = 1, padding: int = 0) -> nn.Module:
    """Conv2d (no bias: BatchNorm supplies it) -> BatchNorm2d -> ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU())


@dataclass(frozen=True, kw_only=True)
class ResNetConfig:
    """Shape of :class:`ResNet`; the defaults give ResNet-50 (25.6M params)."""

    layers: tuple[int, ...] = (3, 4, 6, 3)
    width: int = 64
    num_classes: int = 1000
    in_channels: int = 3

    def __post_init__(self) -> None:
        if not self.layers or min(self.layers) < 1:
            raise ZooError(f"ResNetConfig.layers={self.layers}; every stage needs >= 1 block")


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (strided) -> 1x1 expand, plus a residual skip."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = _cbr(c_in, width, 1)
        self.conv2 = _cbr(width, width, 3, stride=stride, padding=1)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        # A projection is only needed where the skip's shape differs from the block output.
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(c_out))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv3(self.conv2(self.conv1(x))))
        return self.relu(out + self.downsample(x))


class ResNet(nn.Module):
    """ResNet with bottleneck blocks; input ``(B, 3, H, W)``, output ``(B, num_classes)``."""

    def __init__(self, config: ResNetConfig | None = None) -> None:
        super().__init__()
        cfg = config or ResNetConfig()
        self.config = cfg
        self.stem = nn.Sequential(_cbr(cfg.in_channels, cfg.width, 7, stride=2, padding=3),
                                  nn.MaxPool2d(3, stride=2, padding=1))
        blocks: list[nn.Module] = []
        c_in = cfg.width
        for i, n_blocks in enumerate(cfg.layers):
            for j in range(n_blocks):
                # Stages after the first halve the grid in their first block.
                blocks.append(Bottleneck(c_in, cfg.width * 2**i, stride=2 if i and not j else 1))
                c_in = cfg.width * 2**i * Bottleneck.expansion
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


@dataclass(frozen=True, kw_only=True)
class UNetConfig:
    """Shape of :class:`UNet`; inputs need H and W divisible by ``2**depth``."""

    in_channels: int = 3
    num_classes: int = 21
    base_width: int = 64
    depth: int = 4

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ZooError(f"UNetConfig.depth={self.depth}; use at least 1")


def _double_conv(c_in: int, c_out: int) -> nn.Module:
    """Two 3x3 conv-BN-ReLU layers at constant resolution."""
    return nn.Sequential(_cbr(c_in, c_out, padding=1), _cbr(c_out, c_out, padding=1))


class UNet(nn.Module):
    """U-Net: encoder, bottleneck, decoder with concatenated long skips; per-pixel logits."""

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        cfg = config or UNetConfig()
        self.config = cfg
        widths = [cfg.base_width * 2**i for i in range(cfg.depth + 1)]
        self.inc = _double_conv(cfg.in_channels, widths[0])
        self.downs = nn.ModuleList(nn.Sequential(nn.MaxPool2d(2), _double_conv(w, 2 * w))
                                   for w in widths[:-1])
        self.ups = nn.ModuleList(nn.ConvTranspose2d(2 * w, w, 2, stride=2)
                                 for w in reversed(widths[:-1]))
        # Each decoder conv sees the upsampled features concatenated with the skip: 2x channels.
        self.dec = nn.ModuleList(_double_conv(2 * w, w) for w in reversed(widths[:-1]))
        self.head = nn.Conv2d(widths[0], cfg.num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inc(x)
        skips = []
        for down in self.downs:
            skips.append(x)
            x = down(x)
        for up, dec, skip in zip(self.ups, self.dec, reversed(skips)):
            x = dec(torch.cat([up(x), skip], dim=1))
        return self.head(x)


@dataclass(frozen=True, kw_only=True)
class InceptionConfig:
    """Shape of :class:`Inception`: a v3-like stem, then stages split by grid reductions.

    ``stage_blocks[i]`` Inception blocks of branch width ``stage_widths[i]`` (block output is
    ``4 * width`` channels); a reduction block halves the grid between consecutive stages.
    Inputs should be at least 75x75.
    """

    in_channels: int = 3
    num_classes: int = 1000
    stage_blocks: tuple[int, ...] = (3, 4, 2)
    stage_widths: tuple[int, ...] = (64, 192, 320)

    def __post_init__(self) -> None:
        if len(self.stage_blocks) != len(self.stage_widths) or not self.stage_blocks:
            raise ZooError(f"InceptionConfig: stage_blocks={self.stage_blocks} and stage_widths="
                           f"{self.stage_widths} must be non-empty and of equal length")
        if min(self.stage_widths) < 4 or any(w % 4 for w in self.stage_widths):
            raise ZooError(f"InceptionConfig.stage_widths={self.stage_widths}; use multiples of 4")


class InceptionBlock(nn.Module):
    """Four parallel branches (1x1 | 1x1-3x3 | 1x1-3x3-3x3 | pool-1x1) concatenated."""

    def __init__(self, c_in: int, w: int) -> None:
        super().__init__()
        self.b1 = _cbr(c_in, w, 1)
        self.b3 = nn.Sequential(_cbr(c_in, 3 * w // 4, 1), _cbr(3 * w // 4, w, padding=1))
        self.b33 = nn.Sequential(_cbr(c_in, w, 1), _cbr(w, 3 * w // 2, padding=1),
                                 _cbr(3 * w // 2, 3 * w // 2, padding=1))
        self.bpool = nn.Sequential(nn.AvgPool2d(3, stride=1, padding=1), _cbr(c_in, w // 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b3(x), self.b33(x), self.bpool(x)], dim=1)


class ReductionBlock(nn.Module):
    """Grid reduction: strided 3x3 | 1x1-3x3-strided 3x3 | max pool, concatenated."""

    def __init__(self, c_in: int, w: int) -> None:
        super().__init__()
        self.b3 = _cbr(c_in, w, stride=2)
        self.b33 = nn.Sequential(_cbr(c_in, w // 2, 1), _cbr(w // 2, w, padding=1),
                                 _cbr(w, w, stride=2))
        self.pool = nn.MaxPool2d(3, stride=2)
        self.out_channels = c_in + 2 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b3(x), self.b33(x), self.pool(x)], dim=1)


class Inception(nn.Module):
    """Branchy Inception-v3-like classifier; input ``(B, 3, 299, 299)``."""

    def __init__(self, config: InceptionConfig | None = None) -> None:
        super().__init__()
        cfg = config or InceptionConfig()
        self.config = cfg
        self.stem = nn.Sequential(
            _cbr(cfg.in_channels, 32, stride=2), _cbr(32, 32), _cbr(32, 64, padding=1),
            nn.MaxPool2d(3, stride=2), _cbr(64, 80, 1), _cbr(80, 192), nn.MaxPool2d(3, stride=2))
        layers: list[nn.Module] = []
        c_in = 192
        for i, (n_blocks, w) in enumerate(zip(cfg.stage_blocks, cfg.stage_widths)):
            if i > 0:
                red = ReductionBlock(c_in, w)
                layers.append(red)
                c_in = red.out_channels
            for _ in range(n_blocks):
                layers.append(InceptionBlock(c_in, w))
                c_in = 4 * w
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(x, 1))
