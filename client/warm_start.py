"""A public warm start: train the initial global model on public images before federating.

DP-SGD from a random initialisation learns little from a few hundred private images per site
(the noise that hides each image swamps the gradient of a model with 3e5 parameters).
Pretraining on *public* data costs no privacy: nothing private is touched, so no mechanism
is recorded in any site's ledger. In sicfed the public data are SynthCXR sites generated with
a different seed than the federation's (``python -m client synth --seed ...``): the generator
is public, so its images are. Any public image set that the site pipeline can read works
the same way.

The result is an ordinary sicfed checkpoint (:func:`sic_core.checkpoint.save_checkpoint`)
whose path the run config's ``initial-weights`` names; the ServerApp starts from it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from client.config import SiteConfig
from client.data import load_site_data, training_augmentation
from client.device import site_device
from sic_core import SICModel, anchor_support, create_model
from sic_core.errors import ConfigError
from sic_core.training import TrainConfig, TrainHistory, train_sic

__all__ = ["PUBLIC_WARM_START_EPOCHS", "WarmStart", "public_warm_start"]

log = logging.getLogger(__name__)

#: Central epochs of the warm start. Trained against the class anchors, the small B-cos
#: encoder first sits on a plateau (loss ~ ln 2: an input-independent embedding equally
#: similar to every class's anchors) and leaves it after a number of epochs that depends on
#: the seed (epoch 5 to 21 on easy SynthCXR, seeds 0-4); 6 epochs never left it. README,
#: "Differential privacy". `python -m client pretrain --help` spells the number out (tested).
PUBLIC_WARM_START_EPOCHS = 30
#: A warm start whose final loss is above this fraction of its first epoch's has stalled.
STALL_LOSS_FRACTION = 0.95


@dataclass(frozen=True)
class WarmStart:
    """The pretrained model and what it was trained on (for the checkpoint's metadata)."""

    model: SICModel
    history: TrainHistory
    sites: list[str]
    images: int
    seconds: float

    @property
    def stalled(self) -> bool:
        """Whether training never left the initial plateau: the last epoch's loss is at least
        :data:`STALL_LOSS_FRACTION` of the first's (the model then separates nothing; train
        more epochs)."""
        if not self.history.epochs:
            return True
        first, last = self.history.epochs[0].loss, self.history.final_loss
        return last >= STALL_LOSS_FRACTION * first

    def metadata(self) -> dict[str, object]:
        """Checkpoint metadata: provenance of the weights (public data only)."""
        return {
            "kind": "public-warm-start",
            "public_sites": list(self.sites),
            "images": self.images,
            "epochs": len(self.history.epochs),
            "final_loss": self.history.final_loss,
            "stalled": self.stalled,
            "seconds": round(self.seconds, 1),
        }


def public_warm_start(
    configs: Sequence[SiteConfig],
    *,
    encoder: str = "bcos_cnn_small",
    num_classes: int = 2,
    n_shot: int = 3,
    proj_dim: int = 128,
    epochs: int = PUBLIC_WARM_START_EPOCHS,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    device: torch.device | None = None,
) -> WarmStart:
    """Train a fresh SIC model on the training splits of public sites.

    The model is initialised exactly as the ServerApp initialises it (``torch.manual_seed
    (seed)``, then :func:`sic_core.create_model`), and trained centrally against the public
    class anchors (:func:`sic_core.support.anchor_support`), the objective of the federation's
    anchor rounds, with the first site's training augmentation.

    Parameters
    ----------
    configs
        Site configs of the PUBLIC data sets (never a hospital's own data).
    encoder, num_classes, n_shot, proj_dim
        The federation's model (must match its run config).
    epochs, lr, batch_size, seed
        Central training settings.
    device
        Where to train (default: the first site's ``compute.device``); the images stay on
        the host and move to it batch by batch. The returned model is on the CPU.

    Raises
    ------
    ConfigError
        If no site is given or the sites disagree on image size or classes.
    """
    if not configs:
        raise ConfigError("public warm start: give at least one public site config")
    sizes = {config.data.image_size for config in configs}
    classes = {tuple(config.data.class_names) for config in configs}
    if len(sizes) != 1 or len(classes) != 1:
        raise ConfigError(
            "public warm start: the public sites disagree on data.image_size or "
            f"data.class_names ({sorted(sizes)}, {sorted(classes)})"
        )
    if len(next(iter(classes))) != num_classes:
        raise ConfigError(
            f"public warm start: the public sites have {len(next(iter(classes)))} classes, "
            f"the model {num_classes}"
        )
    if device is None:
        device = site_device(configs[0])
    started = time.perf_counter()
    images, labels = [], []
    for config in configs:
        split = load_site_data(config).split("train")
        images.append(split.images)
        labels.append(split.labels)
    all_images, all_labels = torch.cat(images), torch.cat(labels)
    augmentation = training_augmentation(configs[0])
    augment = (lambda batch, _: augmentation(batch, {})[0]) if augmentation.enabled else None
    torch.manual_seed(seed)
    model = create_model(
        encoder, in_channels=1, num_classes=num_classes, n_shot=n_shot, proj_dim=proj_dim
    ).to(device)
    log.info(
        "public warm start: %d images from %d sites, %d epochs",
        all_images.shape[0],
        len(configs),
        epochs,
    )
    history = train_sic(
        model,
        all_images,
        all_labels,
        TrainConfig(
            epochs=epochs,
            lr=lr,
            warmup_epochs=0.0,
            switch_auroc=None,
            batch_size=batch_size,
            seed=seed,
        ),
        augment=augment,
        finalize_support=False,
    )
    model.cpu()
    anchors = anchor_support(num_classes, n_shot, proj_dim, seed=seed)
    model.set_support(anchors.vectors, anchors.labels)
    return WarmStart(
        model=model,
        history=history,
        sites=[config.name for config in configs],
        images=int(all_images.shape[0]),
        seconds=time.perf_counter() - started,
    )
