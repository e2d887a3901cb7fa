"""A :class:`~vlprompt_core.api.FrozenData` made from random images, for testing a
method's :meth:`~vlprompt_core.api.PromptMethod.before_training` and
:meth:`~vlprompt_core.api.PromptMethod.after_training` without a run."""

from __future__ import annotations

import torch

from ..api import ClassSet, FrozenData, FrozenFeatures


class SyntheticFrozenData(FrozenData):
    """``per_class`` training and ``val_per_class`` validation images of every class,
    standard-normal pixels from ``seed``, through the frozen image tower; ``train(views=K)``
    adds a little seeded noise to the pixels of each view (an augmentation's stand-in)."""

    def __init__(self, backbone, classes: ClassSet, per_class: int = 2, val_per_class: int = 1, seed: int = 0):
        self.backbone, self.classes, self.seed = backbone, classes, seed
        n_cls, size = len(classes), backbone.image_size
        gen = torch.Generator().manual_seed(seed)
        self._train = torch.randn(n_cls * per_class, 3, size, size, generator=gen)
        self._val = torch.randn(n_cls * val_per_class, 3, size, size, generator=gen)
        self._train_labels = torch.arange(n_cls).repeat_interleave(per_class)
        self._val_labels = torch.arange(n_cls).repeat_interleave(val_per_class)

    @torch.no_grad()
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode_image(images).float()

    def train(self, views: int = 0) -> FrozenFeatures:
        if views == 0:
            return FrozenFeatures(self._encode(self._train), self._train_labels.clone())
        gen = torch.Generator().manual_seed(self.seed + 1)
        stacked = [self._encode(self._train + 0.1 * torch.randn(self._train.shape, generator=gen))
                   for _ in range(views)]
        return FrozenFeatures(torch.stack(stacked), self._train_labels.clone())

    def val(self) -> FrozenFeatures:
        return FrozenFeatures(self._encode(self._val), self._val_labels.clone())


def synthetic_frozen_data(backbone, classes: ClassSet, per_class: int = 2, val_per_class: int = 1,
                          seed: int = 0) -> SyntheticFrozenData:
    """See :class:`SyntheticFrozenData`."""
    return SyntheticFrozenData(backbone, classes, per_class, val_per_class, seed)
