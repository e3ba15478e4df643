"""Identity Mapping Hourglass Network (IMHN): image to 50 heatmap channels at 5 scales per stack.

Paper: J. Li, W. Su, Z. Wang, "Simple Pose: Rethinking and Improving a Bottom-up Approach for Multi-Person
Pose Estimation", AAAI 2020 (arXiv 1911.10529).
Original code: https://github.com/hellojialee/Improved-Body-Parts (`models/posenet.py`,
`models/layers_transposed.py`), re-implemented here (docs/method.md §5) without copying it.
Weights: the authors' released checkpoint `PoseNet_52_epoch.pth` is distributed by them, not by this project;
check the license and terms of their repository before using it. It loads through
`simplepose.checkpoint.load_model`, which only renames keys: module and attribute names below reproduce the
reference state_dict layout (`pre.*`, `hourglass.*`, `features.*`, `outs.*`, `merge_features.*`,
`merge_preds.*`) exactly.

Architecture (released variant, `IMHN(stacks=4, width=256, increase=128, outputs=50)`, 128 998 760 parameters):
stem to stride 4 (7x7 conv, bottleneck residuals, 6 chained dilated convs, concat) -> per stack an order-4
hourglass with widths C_d = width + increase*d returning 5 maps (strides 4..64) -> per scale 2x conv3x3 + SE
and a linear 1x1 output of 50 channels -> cross-stage identity mappings of predictions and features.
Every activation is LeakyReLU(0.01).
"""
from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn
from torch.nn import functional as F

from simplepose.skeleton import NUM_CHANNELS

LOG = logging.getLogger(__name__)

NUM_SCALES = 5
"""Outputs per stack: the hourglass of order 4 yields maps at strides 4, 8, 16, 32, 64."""

INPUT_MULTIPLE = 2 ** (NUM_SCALES + 1)
"""Input height and width must be multiples of 64 (stride 4 stem, then 4 halvings)."""

_SLOPE = 0.01  # LeakyReLU negative slope, everywhere in the reference
_SE_REDUCTION = 16
_DILATIONS = (3, 3, 4, 4, 5, 5)


def network_input(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 BGR images (N, H, W, 3) -> the network's input float32 (N, 3, H, W) = BGR / 255 (no mean or std,
    docs/method.md §4.4). Call it where the model runs: uint8 crosses to the accelerator in a quarter of the bytes.
    channels_last: return that memory format (the NHWC source already is, so it costs no copy)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"network_input: images must be uint8 (N, H, W, 3) BGR, got {images.dtype} "
                         f"{tuple(images.shape)}")
    x = images.permute(0, 3, 1, 2).float().div_(255)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@dataclasses.dataclass(frozen=True)
class IMHNConfig:
    """Size of an IMHN. The defaults are the authors' released model (docs/method.md §5).

    stacks: hourglass stages (>= 1); width: channels of the stem output, the stride-4 hourglass level and
    every head (multiple of 16); increase: channels added per hourglass level (even, >= 0);
    outputs: heatmap channels per scale (50 = 30 body parts + 18 keypoints + person mask + max keypoint).
    """

    stacks: int = 4
    width: int = 256
    increase: int = 128
    outputs: int = NUM_CHANNELS

    def __post_init__(self):
        for name in ("stacks", "width", "increase", "outputs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"IMHNConfig.{name} must be an int, got {type(value).__name__} {value!r}")
        if self.stacks < 1:
            raise ValueError(f"IMHNConfig.stacks must be >= 1, got {self.stacks}")
        if self.width < 16 or self.width % 16:
            raise ValueError(f"IMHNConfig.width must be a positive multiple of 16, got {self.width}")
        if self.increase < 0 or self.increase % 2:
            raise ValueError(f"IMHNConfig.increase must be even and >= 0, got {self.increase}")
        if self.outputs < 1:
            raise ValueError(f"IMHNConfig.outputs must be >= 1, got {self.outputs}")

    def level_widths(self) -> tuple[int, ...]:
        """Channels C_d = width + increase*d of the hourglass levels d = 0..4, one per output scale."""
        return tuple(self.width + self.increase * d for d in range(NUM_SCALES))


class Conv(nn.Module):
    """k x k conv (stride 1, 'same' padding, optional dilation) -> optional BN -> optional LeakyReLU.

    The conv has a bias only when there is no BN. Keys: `conv.*`, `bn.*`.
    """

    def __init__(self, cin: int, cout: int, kernel: int = 3, bn: bool = True, relu: bool = True,
                 dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=dilation * (kernel - 1) // 2, dilation=dilation,
                              bias=not bn)
        self.bn = nn.BatchNorm2d(cout) if bn else None
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return F.leaky_relu(x, _SLOPE) if self.relu else x


class Residual(nn.Module):
    """Post-activation bottleneck: 1x1 (cin -> cout/2), 3x3, 1x1 (-> cout), each with BN, plus a skip path
    (identity, or 1x1 conv + BN when cin != cout), summed, then LeakyReLU. (N,cin,H,W) -> (N,cout,H,W)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = cout // 2
        self.convBlock = nn.Sequential(  # noqa: N815 (reference key name)
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.LeakyReLU(_SLOPE),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.LeakyReLU(_SLOPE),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.skipConv = (  # noqa: N815 (reference key name)
            nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)) if cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.skipConv is None else self.skipConv(x)
        return F.leaky_relu(self.convBlock(x) + skip, _SLOPE)


class SELayer(nn.Module):
    """Squeeze-and-excitation: mean over H, W -> Linear(C, C/16) -> LeakyReLU -> Linear -> sigmoid, which
    scales the channels of the input. (N,C,H,W) -> (N,C,H,W). Keys: `fc.0.*`, `fc.2.*`."""

    def __init__(self, channels: int):
        super().__init__()
        hidden = channels // _SE_REDUCTION
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.LeakyReLU(_SLOPE),
                                nn.Linear(hidden, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x.mean(dim=(2, 3)))[:, :, None, None]


class Stem(nn.Module):
    """Backbone to stride 4: (N,3,H,W) -> (N,width,H/4,W/4) = concat([a, b]) where a is the residual branch
    (width/2 channels) and b = the 6 dilated convs (dilations 3,3,4,4,5,5) chained on a (docs/method.md §5.2)."""

    def __init__(self, width: int):
        super().__init__()
        half = width // 2
        self.conv1 = nn.Conv2d(3, half // 2, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(half // 2)
        self.res1 = Residual(half // 2, half)
        self.res2 = Residual(half, half)
        self.dilation = nn.Sequential(*(Conv(half, half, 3, dilation=d) for d in _DILATIONS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.bn1(self.conv1(x)), _SLOPE)
        a = self.res2(F.max_pool2d(self.res1(x), 2))
        return torch.cat([a, self.dilation(a)], dim=1)


class Hourglass(nn.Module):
    """Order-4 hourglass of bottleneck residuals (docs/method.md §5.3).

    (N,C_0,H,W) -> 5 maps, highest resolution first: [output (C_0, H), low2@d0 (C_1, H/2), ...,
    low2@d3 (C_4, H/16)]. `hg[d]` = [skip Residual(C_d,C_d), down Residual(C_d,C_{d+1}) after a 2x2 max-pool,
    up Residual(C_{d+1},C_d), Conv3x3(C_d,C_d) after a nearest x2 upsample]; `hg[3][4]` is the innermost block.
    """

    def __init__(self, widths: tuple[int, ...]):
        super().__init__()
        depth = len(widths) - 1
        self.hg = nn.ModuleList()
        for d in range(depth):
            blocks = [Residual(widths[d], widths[d]), Residual(widths[d], widths[d + 1]),
                      Residual(widths[d + 1], widths[d]), Conv(widths[d], widths[d], 3)]
            if d == depth - 1:
                blocks.append(Residual(widths[depth], widths[depth]))
            self.hg.append(nn.ModuleList(blocks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        lows: list[torch.Tensor] = []
        return [self._level(0, x, lows)] + lows

    def _level(self, d: int, x: torch.Tensor, lows: list[torch.Tensor]) -> torch.Tensor:
        blocks = self.hg[d]
        up1 = blocks[0](x)
        low1 = blocks[1](F.max_pool2d(x, 2))
        low2 = blocks[4](low1) if d == len(self.hg) - 1 else self._level(d + 1, low1, lows)
        lows.insert(0, low2)  # deeper levels record first; the shallowest must end up first
        low3 = blocks[2](low2)
        return up1 + blocks[3](F.interpolate(low3, scale_factor=2, mode="nearest"))


class Features(nn.Module):
    """Per-scale feature heads: before_regress[j] = Conv3x3(C_j -> width) -> Conv3x3 -> SE.
    5 maps (N,C_j,h_j,w_j) -> 5 maps (N,width,h_j,w_j)."""

    def __init__(self, widths: tuple[int, ...], width: int):
        super().__init__()
        self.before_regress = nn.ModuleList(
            nn.Sequential(Conv(c, width, 3), Conv(width, width, 3), SELayer(width)) for c in widths)

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        return [head(m) for head, m in zip(self.before_regress, maps)]


class Merge(nn.Module):
    """Cross-stage identity mapping: 1x1 conv (no bias) + BN, no activation. Keys: `conv.conv.*`, `conv.bn.*`."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = Conv(cin, cout, 1, bn=True, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class IMHN(nn.Module):
    """Identity Mapping Hourglass Network (docs/method.md §5).

    forward(x): x float (N,3,H,W), BGR / 255 (no mean/std normalisation), H and W multiples of 64.
    Returns a list over stacks of lists of 5 tensors (N,outputs,H/4/2^j,W/4/2^j), j = 0 (stride 4) first.
    The outputs are linear (no sigmoid). Cell (i, j) at stride 4 stands for input pixel (4j+1.5, 4i+1.5).
    """

    def __init__(self, stacks: int = 4, width: int = 256, increase: int = 128, outputs: int = NUM_CHANNELS):
        super().__init__()
        self.config = IMHNConfig(stacks=stacks, width=width, increase=increase, outputs=outputs)
        widths = self.config.level_widths()
        self.pre = Stem(width)
        self.hourglass = nn.ModuleList(Hourglass(widths) for _ in range(stacks))
        self.features = nn.ModuleList(Features(widths, width) for _ in range(stacks))
        self.outs = nn.ModuleList(
            nn.ModuleList(Conv(width, outputs, 1, bn=False, relu=False) for _ in widths) for _ in range(stacks))
        self.merge_features = nn.ModuleList(
            nn.ModuleList(Merge(width, c) for c in widths) for _ in range(stacks - 1))
        self.merge_preds = nn.ModuleList(
            nn.ModuleList(Merge(outputs, c) for c in widths) for _ in range(stacks - 1))
        if not self.pre.conv1.weight.is_meta:  # meta tensors hold no values (shape-only builds)
            self.reset_parameters()

    @classmethod
    def from_config(cls, config: IMHNConfig) -> IMHN:
        if not isinstance(config, IMHNConfig):
            raise TypeError(f"IMHN.from_config needs an IMHNConfig, got {type(config).__name__}")
        return cls(**dataclasses.asdict(config))

    def reset_parameters(self) -> None:
        """Training init of the reference (docs/method.md §5.5): conv weights N(0, 0.001^2), linear N(0, 0.01^2),
        biases 0, BN gamma 1 and beta 0."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(module.weight, std=0.001 if isinstance(module, nn.Conv2d) else 0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        self._check_input(x)
        x = self.pre(x)
        predictions: list[list[torch.Tensor]] = []
        cache: list[torch.Tensor] | None = None
        last = len(self.hourglass) - 1
        for i in range(len(self.hourglass)):
            maps = self.hourglass[i](x)
            if cache is not None:
                maps = [m + c for m, c in zip(maps, cache)]
            feats = self.features[i](maps)
            preds = [out(f) for out, f in zip(self.outs[i], feats)]
            predictions.append(preds)
            if i == last:
                break
            merged_preds = [merge(p) for merge, p in zip(self.merge_preds[i], preds)]
            merged_feats = [merge(f) for merge, f in zip(self.merge_features[i], feats)]
            cache = [mp + mf for mp, mf in zip(merged_preds, merged_feats)]
            if self.training:
                # The reference runs the j = 0 merges a second time for the next stage's input, which
                # updates their BN running statistics twice per step; keep that for training parity.
                # In eval mode the second run would give the same tensors, so they are reused.
                merged_preds[0] = self.merge_preds[i][0](preds[0])
                merged_feats[0] = self.merge_features[i][0](feats[0])
            x = (x + merged_preds[0]) + merged_feats[0]  # left to right, as the reference rounds (docs/method.md §5.4)
        return predictions

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"IMHN input must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"IMHN input must be (N, 3, H, W) BGR/255, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"IMHN input must be a float tensor (BGR / 255), got {x.dtype}")
        height, width = x.shape[-2:]
        if height % INPUT_MULTIPLE or width % INPUT_MULTIPLE or height == 0 or width == 0:
            raise ValueError(f"IMHN input height and width must be positive multiples of {INPUT_MULTIPLE}, "
                             f"got {height}x{width}; pad the image (simplepose.infer does)")
