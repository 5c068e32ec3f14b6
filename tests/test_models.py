"""PatchCore and PaDiM: coreset, statistics, accuracy floors on synthetic and real data."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_category, synth_test_images

from edgeinspect.config import load_config
from edgeinspect.train.models import Padim, PatchCore
from edgeinspect.train.models.base import aggregate_stages
from edgeinspect.train.models.patchcore import greedy_coreset
from edgeinspect.train.models.patchcore.model import BANK_BLOCK
from edgeinspect.train.trainer import train

# Floors on the small synthetic set: a model that scores noise, brightness or nothing misses them
# (tests/test_synth.py shows mean brightness alone stays below 0.75 image AUROC).
SYNTH_IMAGE_AUROC_FLOOR = 0.85
SYNTH_PIXEL_AUROC_FLOOR = 0.85


def test_greedy_coreset_covers_better_than_random() -> None:
    gen = torch.Generator().manual_seed(0)
    # clustered data: a few dense blobs and some far outliers a good coreset must include
    centers = torch.randn(8, 32, generator=gen) * 10
    points = torch.cat([centers[i % 8] + torch.randn(32, generator=gen) for i in range(4000)]).reshape(4000, 32)
    points = torch.cat([points, torch.randn(5, 32, generator=gen) * 60])
    idx = greedy_coreset(points, 100, projection_dim=16, progress=False)
    assert len(set(idx.tolist())) == 100

    def coverage(sel: torch.Tensor) -> float:
        return float(torch.cdist(points, points[sel]).amin(1).max())

    random_idx = torch.randperm(len(points), generator=gen)[:100]
    assert coverage(idx) < 0.5 * coverage(random_idx)
    assert set(range(4000, 4005)) <= set(idx.tolist())  # every outlier kept

    # in chunks (composable coreset): the same number of distinct picks, outliers kept, coverage close
    chunked = greedy_coreset(points, 100, projection_dim=16, progress=False, chunk_size=1000)
    assert len(chunked) == 100 and len(set(chunked.tolist())) == 100
    assert set(range(4000, 4005)) <= set(chunked.tolist())
    assert coverage(chunked) < 1.5 * coverage(idx) < 0.75 * coverage(random_idx)


def test_patchcore_blocked_search_is_the_exact_nearest_neighbour() -> None:
    """The bank is searched in blocks of BANK_BLOCK entries (for the CPU cache); the distances must be
    those of a plain search over the whole bank, also with a last block shorter than the others."""
    model = PatchCore(pretrained=False)
    dim = model.search.minus_two_bank_t.shape[0]
    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(2 * BANK_BLOCK + 37, dim, generator=gen)
    model.load_statistics({"memory_bank": bank.numpy()})
    embedding = torch.randn(2, dim, 5, 7, generator=gen)
    patches = embedding.permute(0, 2, 3, 1).reshape(-1, dim)
    expected = torch.cdist(patches.double(), bank.double()).amin(1).reshape(2, 1, 5, 7)
    torch.testing.assert_close(model.patch_scores(embedding).double(), expected, rtol=1e-4, atol=1e-3)


def test_patchcore_principal_subspace_search_is_a_lower_bound_that_keeps_off_subspace_patches() -> None:
    """With ``search_variance`` < 1 the search runs in the bank's leading principal axes plus each vector's residual
    norm: never above the exact distance, and a patch far off the bank's subspace keeps its distance through its
    residual norm. The subspace goes into the statistics and comes back."""
    gen = torch.Generator().manual_seed(0)
    dim, rank = 152, 12
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=gen))[0]
    bank = (torch.randn(3000, rank, generator=gen) * torch.linspace(10.0, 3.0, rank)) @ basis[:, :rank].T
    bank += 0.05 * torch.randn(3000, dim, generator=gen)
    model = PatchCore(pretrained=False, search_variance=0.99)
    model.set_bank(bank)
    k = model.subspace.axes.shape[1]
    assert 0 < k <= rank and model.search.bank().shape == (3000, k + 1)
    like_bank = bank[:200] + 0.05 * torch.randn(200, dim, generator=gen)  # as far from it as its own noise
    off = bank[200:210] + 5.0 * basis[:, rank + 5]  # 5 away from the bank's subspace
    patches = torch.cat([like_bank, off])
    exact = torch.cdist(patches.double(), bank.double()).amin(1).float()
    reduced = model.patch_scores(patches.T.reshape(1, dim, 1, -1)).flatten()
    assert (reduced <= exact + 1e-3).all()
    assert (reduced[200:] > 4.0).all() and (reduced[200:] > 2 * reduced[:200].max()).all()
    restored = PatchCore(pretrained=False, search_variance=0.99)
    restored.load_statistics(model.statistics())
    torch.testing.assert_close(restored.patch_scores(patches.T.reshape(1, dim, 1, -1)).flatten(), reduced)
    on_meta = PatchCore(pretrained=False, search_variance=0.99).to("meta")  # fit on the CPU, the model elsewhere
    on_meta.set_bank(bank)
    assert on_meta.subspace.axes.device.type == on_meta.search.minus_two_bank_t.device.type == "meta"
    exact_model = PatchCore(pretrained=False, search_variance=1.0)
    exact_model.set_bank(bank)
    assert exact_model.subspace.axes.shape[1] == 0 and "search_axes" not in exact_model.statistics()
    torch.testing.assert_close(exact_model.patch_scores(patches.T.reshape(1, dim, 1, -1)).flatten(), exact,
                               rtol=1e-4, atol=1e-3)


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


@pytest.mark.parametrize("fixture", ["patchcore_bundle", "padim_bundle"])
def test_synthetic_accuracy_floor(fixture: str, request: pytest.FixtureRequest) -> None:
    metrics = _manifest(request.getfixturevalue(fixture))["metrics"]
    assert metrics["image_auroc"] >= SYNTH_IMAGE_AUROC_FLOOR, metrics
    assert metrics["pixel_auroc"] >= SYNTH_PIXEL_AUROC_FLOOR, metrics
    assert metrics["n_images"] == synth_test_images()


def test_patchcore_memory_bank_is_the_coreset(patchcore_bundle: Path) -> None:
    m = _manifest(patchcore_bundle)
    bank = np.load(patchcore_bundle / m["files"]["memory_bank"]["file"], allow_pickle=False)
    fit_images = m["data"]["fit_images"]
    patches_per_image = 28 * 28  # stage3 of Lite0 at 224 px
    # 10 % of the patches, at most the cap (the synthetic fixture's 10 % is just above the default 4,096)
    expected = min(round(0.1 * fit_images * patches_per_image), m["model"]["max_bank"] or 10**9)  # 0: no cap
    assert bank.shape == (expected, 40 + 112)
    assert np.isfinite(bank).all()


def test_patchcore_bank_is_capped_at_max_bank(caplog: pytest.LogCaptureFixture) -> None:
    """``model.max_bank`` bounds the bank (and the search time) whatever the training-set size; 0 = no cap. A cap
    that binds says so in the log."""
    good = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    sizes, capped = [], []
    for cap in (0, 1000, 20):
        model = PatchCore(input_size=(64, 64), pretrained=False, coreset_ratio=0.5, max_bank=cap)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="edgeinspect.train.models.patchcore.model"):
            model.fit([good], progress=False)
        sizes.append(model.memory_bank.shape[0])
        capped.append("model.max_bank" in caplog.text)
    assert sizes == [6 * 8 * 8 // 2, 6 * 8 * 8 // 2, 20]  # 8 x 8 patches per 64 px image
    assert capped == [False, False, True]
    assert "would be 192" in caplog.text  # 50 % of the 384 patches


def test_padim_statistics_shapes_and_inverse(padim_bundle: Path) -> None:
    m = _manifest(padim_bundle)
    mean = np.load(padim_bundle / m["files"]["padim_mean"]["file"])
    inv_cov = np.load(padim_bundle / m["files"]["padim_inv_cov"]["file"])
    assert mean.shape == (28 * 28, 100) and inv_cov.shape == (28 * 28, 100, 100)
    # the inverse of a regularised covariance is symmetric positive definite
    assert np.allclose(inv_cov[0], inv_cov[0].T, atol=1e-3 * np.abs(inv_cov[0]).max())
    assert np.linalg.eigvalsh(inv_cov[0].astype(np.float64)).min() > 0


@pytest.mark.parametrize("n_features,seed", [(100, 0), (5, 1)])
def test_padim_picks_its_channels_before_upsampling(n_features: int, seed: int) -> None:
    """The subset taken from each stage before upsampling is the subset of the upsampled concatenation, in
    its order (5 of 232 channels with seed 1: none of the finest stage's, which still sets the size)."""
    model = Padim(n_features=n_features, seed=seed, pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        stages = model.extractor(x)
        expected = aggregate_stages(stages, 1).index_select(1, model.channel_idx)
        model.extractor.forward = lambda _: stages  # the same stage features for both
        assert sum(map(len, model.stage_picks)) == n_features and (seed != 1 or not model.stage_picks[0])
        torch.testing.assert_close(model.embed(x), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


def test_padim_scores_with_the_channels_its_statistics_name() -> None:
    """A bundle's channel subset wins over the one the seed would pick: a model built with another seed (or
    a torch whose random numbers changed) scores like the one that was fit once it loads the statistics."""
    gen = torch.Generator().manual_seed(0)
    good, probe = torch.randn(4, 3, 64, 64, generator=gen), torch.randn(2, 3, 64, 64, generator=gen)
    fitted = Padim(input_size=(64, 64), n_features=20, seed=0, pretrained=False).eval()
    fitted.fit([good], progress=False)
    restored = Padim(input_size=(64, 64), n_features=20, seed=1, pretrained=False).eval()
    restored.extractor.load_state_dict(fitted.extractor.state_dict())
    assert not torch.equal(restored.channel_idx, fitted.channel_idx)
    restored.load_statistics(fitted.statistics())
    assert restored.stage_picks == fitted.stage_picks
    with torch.no_grad():
        torch.testing.assert_close(restored(probe)[1], fitted(probe)[1])


def test_models_score_an_obvious_anomaly_higher() -> None:
    gen = torch.Generator().manual_seed(0)
    good = torch.randn(6, 3, 64, 64, generator=gen) * 0.1
    bad = good[:1].clone()
    bad[:, :, 20:40, 20:40] += 3.0
    for model in (PatchCore(input_size=(64, 64), pretrained=False), Padim(input_size=(64, 64), pretrained=False)):
        model.fit([good], progress=False)
        with torch.no_grad():
            amap, score = model(torch.cat([good[1:2], bad]))
        assert amap.shape == (2, 1, 64, 64)
        assert score[1] > score[0]
        assert torch.allclose(score, amap.flatten(1).amax(1))
        # the anomaly map peaks inside the defect square
        peak = int(amap[1, 0].argmax())
        assert 14 <= peak // 64 <= 46 and 14 <= peak % 64 <= 46


@pytest.mark.parametrize("family,floor", [("patchcore", 0.99), ("padim", 0.97)])
def test_mvtec_bottle_image_auroc(family: str, floor: float, tmp_path: Path) -> None:
    root = shared_category("mvtec_ad/bottle").parent
    bundle = train(family, root, "bottle", tmp_path / family, load_config(family), device="cpu", progress=False)
    metrics = bundle.manifest["metrics"]
    assert metrics["n_images"] == 83
    assert metrics["image_auroc"] >= floor, metrics
    assert metrics["pixel_auroc"] >= 0.9, metrics


def test_labelled_validation_split_sets_an_f1_optimal_threshold(tmp_path: Path) -> None:
    from edgeinspect.train.data import synthesize

    root = tmp_path / "data"
    cat = synthesize(root, "washer", seed=3, n_train=30, n_test_good=12, n_test_per_defect=6)
    # move half of each test folder (and its masks) into a labelled val/ split
    for folder in sorted((cat / "test").iterdir()):
        for image in sorted(folder.glob("*.png"))[::2]:
            (cat / "val" / folder.name).mkdir(parents=True, exist_ok=True)
            image.rename(cat / "val" / folder.name / image.name)
    bundle = train("padim", root, "washer", tmp_path / "b", load_config("padim"), device="cpu", progress=False)
    decision = bundle.manifest["decision"]
    assert decision["calibration"]["source"] == "labelled validation split"
    assert decision["calibration"]["n_images"] == 6 + 4 * 3
    assert bundle.manifest["data"]["fit_images"] == 30  # nothing held out from train/good
    assert bundle.manifest["metrics"]["n_images"] == 6 + 4 * 3


def test_threshold_rules_on_held_out_good_scores() -> None:
    from edgeinspect.train.trainer import decide

    good = np.array([10.0, 11.0, 12.0, 13.0, 30.0])  # one unusual good image
    cfg = load_config("patchcore")["decision"]
    assert cfg["threshold_rule"] == "mean_sd" and cfg["threshold_sd"] == 2.0
    mean_sd = decide(good, cfg)
    # mean 15.2, sample standard deviation sqrt((5.2^2 + 4.2^2 + 3.2^2 + 2.2^2 + 14.8^2) / 4) = sqrt(278.8 / 4)
    assert mean_sd["threshold"] == pytest.approx(15.2 + 2 * np.sqrt(278.8 / 4))
    assert mean_sd["calibration"] == {"source": "held-out good images", "n_images": 5, "rule": "mean_sd",
                                      "margin": 1.0, "sd": 2.0}
    quantile = decide(good, {**cfg, "threshold_rule": "quantile", "threshold_quantile": 1.0, "threshold_margin": 1.1})
    assert quantile["threshold"] == pytest.approx(33.0) and quantile["calibration"]["quantile"] == 1.0
    # the normalised score puts the threshold at 0.5 and the median good score at 0
    norm = mean_sd["normalization"]
    assert norm["center"] == mean_sd["threshold"] and norm["scale"] == pytest.approx(mean_sd["threshold"] - 12.0)
    # bundles written before threshold_rule existed keep the quantile rule on re-calibration
    old = {k: v for k, v in cfg.items() if k not in ("threshold_rule", "threshold_sd")}
    assert decide(good, old)["threshold"] == pytest.approx(30.0)
