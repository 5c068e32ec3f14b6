"""CAM (Zhou et al., CVPR 2016, "Learning Deep Features for Discriminative Localization"): an ImageNet
CNN's last conv layer, global average pooling and one dense layer to two classes (good, anomaly),
fine-tuned on labelled images; the class activation map localises the anomaly.

The map and the score share units (the runtime thresholds the map with the score's threshold). With
f(x, y) the last conv layer's features and (w_c, b_c) the dense layer of class c, the per-position
logit difference

    M(x, y) = (w_anomaly - w_good) . f(x, y) + (b_anomaly - b_good)

is the anomaly class's activation map minus the good one's (each with its bias), and its spatial mean
is exactly the image's logit difference (pooling and the dense layer are both linear). So

    score = softmax(dense(GAP(f)))[anomaly] = sigmoid(mean M)      anomaly map = sigmoid(M), upsampled

are both anomaly probabilities, and an image scored above a threshold t has mean M, hence max M,
above logit(t): its map has a region above t (the boxes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from edgeinspect.errors import DataError
from edgeinspect.train.data.split import DataSplit, all_samples, stratified_split
from edgeinspect.train.models.base import BackboneAnomalyModel
from edgeinspect.train.models.cam.config import CamSection

if TYPE_CHECKING:
    from edgeinspect.train.data.batches import Batches
    from edgeinspect.train.data.mvtec import MVTecCategory

GOOD, ANOMALY = 0, 1


class Cam(BackboneAnomalyModel):
    """Good/anomaly classifier on the backbone's last used stage; only the last ``trainable_convs`` conv
    layers of the (truncated) backbone and the dense layer are trained, the rest stays ImageNet's
    (batch norms frozen in eval mode). On EfficientNet-Lite0 with ``stages: [stage5]`` these are the
    expand (1x1), depthwise (5x5) and project (1x1) convs of stage5's last block; on VGG16 with
    ``[block5]``, conv5_1..conv5_3."""

    family = "cam"
    config_section = CamSection
    fit_is_statistics = False

    def __init__(self, backbone: str = "efficientnet_lite0", stages: Sequence[str] = ("stage5",),
                 input_size: Sequence[int] = (224, 224), *, trainable_convs: int = 3, epochs: int = 10,
                 learning_rate: float = 1e-4, class_weights: Sequence[float] = (1.0, 3.0),
                 target_accuracy: float = 0.98, test_fraction: float = 0.2, smoothing_sigma: float = 0.0,
                 seed: int = 0, pretrained: bool = True, weights: str | None = None):
        super().__init__(backbone, stages, tuple(input_size), smoothing_sigma, pretrained=pretrained,
                         weights=weights)
        self.trainable_convs = trainable_convs
        self.epochs = epochs
        self.learning_rate = learning_rate
        self.class_weights = tuple(float(w) for w in class_weights)
        self.target_accuracy = target_accuracy
        self.test_fraction = test_fraction
        self.smoothing_sigma = smoothing_sigma
        self.seed = seed
        self.dense = nn.Linear(self.extractor.channels()[0], 2)
        convs = [(name, m) for name, m in self.extractor.named_modules() if isinstance(m, nn.Conv2d)]
        if len(convs) < trainable_convs:
            raise ValueError(f"trainable_convs: {trainable_convs} is more than the {len(convs)} conv layers "
                             f"up to {list(stages)}")
        self.tuned_layers = [name for name, _ in convs[-trainable_convs:]]
        for _, conv in convs[-trainable_convs:]:
            conv.requires_grad_(True)

    @classmethod
    def data_split(cls, dataset: MVTecCategory, config: dict[str, Any]) -> DataSplit:
        """Supervised: every image of the category (train/, val/, test/) split by defect type, seeded:
        ``test_fraction`` for the test, then ``train.holdout_fraction`` of the rest (labelled) for the
        threshold, the remainder to fit on."""
        model, train = config["model"], config["train"]
        images = all_samples(dataset)
        if not any(s.label for s in images):
            raise DataError(f"cam is a supervised classifier and needs defective images (test/<defect type>/ "
                            f"or val/<defect type>/); {dataset.path} has none")
        rest, test = stratified_split(images, model["test_fraction"], model["seed"])
        fit, calibration = stratified_split(rest, train["holdout_fraction"], model["seed"] + 1)
        if len(calibration) < train["min_holdout"]:
            raise DataError(f"only {len(calibration)} images held out to set the threshold (train.min_holdout "
                            f"is {train['min_holdout']}); raise train.holdout_fraction or add images")
        percent = f"{100 * model['test_fraction']:g} %"
        return DataSplit(fit, calibration, True, test,
                         f"cam: stratified {percent} hold-out of all images (seed {model['seed']}), never fit on")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The last conv layer's features f, N x C x h x w."""
        return self.extractor(x)[0]

    def class_maps(self, embedding: torch.Tensor) -> torch.Tensor:
        """Class activation maps N x 2 x h x w: w_c . f(x, y) + b_c for c = good, anomaly."""
        return F.conv2d(embedding, self.dense.weight[:, :, None, None], self.dense.bias)

    def logit_difference(self, embedding: torch.Tensor) -> torch.Tensor:
        """M = anomaly map minus good map, N x 1 x h x w (its spatial mean is the image logit difference)."""
        maps = self.class_maps(embedding)
        return maps[:, ANOMALY:ANOMALY + 1] - maps[:, GOOD:GOOD + 1]

    def patch_scores(self, embedding: torch.Tensor) -> torch.Tensor:
        """sigmoid(M): the anomaly probability of each position, in the units of the image score."""
        return torch.sigmoid(self.logit_difference(embedding))

    def logits(self, embedding: torch.Tensor) -> torch.Tensor:
        """Class logits N x 2: global average pooling, then the dense layer."""
        return self.dense(embedding.mean(dim=(2, 3)))

    def image_score(self, embedding: torch.Tensor, amap: torch.Tensor) -> torch.Tensor:
        """The classifier's anomaly probability softmax(logits)[anomaly] (= sigmoid(mean M))."""
        return torch.softmax(self.logits(embedding), dim=1)[:, ANOMALY]

    def fit(self, batches: Batches, progress: bool = True, *, holdout: Batches | None = None) -> None:
        """Adam on the weighted cross-entropy over shuffled epochs of labelled images; stops after the epoch
        whose training accuracy reaches ``target_accuracy`` (at most ``epochs``). The labelled hold-out's
        loss and accuracy are recorded per epoch (they do not steer training)."""
        device = self.dense.weight.device
        params = [p for p in self.parameters() if p.requires_grad]
        optimiser = torch.optim.Adam(params, lr=self.learning_rate)
        loss_fn = nn.CrossEntropyLoss(weight=torch.tensor(self.class_weights, device=device))
        self.history = {"loss": [], "train_accuracy": []}
        if holdout is not None:
            self.history.update(holdout_loss=[], holdout_accuracy=[])
        for epoch in range(self.epochs):
            self.train()
            loss_sum, correct, seen = 0.0, 0, 0
            for x, y in tqdm(batches.epoch(epoch), total=len(batches), desc=f"epoch {epoch + 1}/{self.epochs}",
                             disable=not progress, unit="batch"):
                x, y = x.to(device), y.to(device)
                logits = self.logits(self.embed(x))
                loss = loss_fn(logits, y)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                loss_sum += float(loss.detach()) * len(y)
                correct += int((logits.argmax(1) == y).sum())
                seen += len(y)
            self.history["loss"].append(loss_sum / seen)
            self.history["train_accuracy"].append(correct / seen)
            if holdout is not None:
                loss, accuracy = self._evaluate(holdout, loss_fn)
                self.history["holdout_loss"].append(loss)
                self.history["holdout_accuracy"].append(accuracy)
            if correct / seen >= self.target_accuracy:
                break
        self.eval()

    @torch.no_grad()
    def _evaluate(self, batches: Batches, loss_fn: nn.Module) -> tuple[float, float]:
        """(weighted cross-entropy, accuracy) over labelled batches, in eval mode."""
        self.eval()
        device = self.dense.weight.device
        logits = torch.cat([self.logits(self.embed(x.to(device))) for x in batches])
        labels = torch.from_numpy(batches.labels).to(device)
        return float(loss_fn(logits, labels)), float((logits.argmax(1) == labels).float().mean())

    def hyperparameters(self) -> dict:
        """Constructor arguments (without weights)."""
        return {"backbone": self.extractor.spec.name, "stages": self.extractor.stages,
                "input_size": list(self.input_size), "trainable_convs": self.trainable_convs,
                "epochs": self.epochs, "learning_rate": self.learning_rate,
                "class_weights": list(self.class_weights), "target_accuracy": self.target_accuracy,
                "test_fraction": self.test_fraction, "smoothing_sigma": self.smoothing_sigma, "seed": self.seed}
