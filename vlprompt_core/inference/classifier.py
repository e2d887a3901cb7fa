"""A trained method as an image classifier: :class:`Classifier` scores images (files,
PIL images or tensors) under a class list, as a run scores its test images, and
returns :class:`Predictions`."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn.functional as F
from PIL import Image

from ..api import ClassSet, PromptMethod
from ..data import Unreadable, class_count_problem, read_rgb, test_transform, user_classes
from ..data.images import _to_rgb
from ..engine import ProgressReporter, autocast, forward, make_batch
from ..engine.batches import check_scores
from ..errors import UserError
from ..prompting import text_chunking
from ..settings import TrainSpec

#: What :meth:`Classifier.predict` takes: a path, a PIL image, an image tensor
#: (``[3, H, W]``, or ``[N, 3, H, W]`` for N images), or a list of them.
ImageInput = Union[str, os.PathLike, Image.Image, torch.Tensor]


@dataclass
class Predictions:
    """What :meth:`Classifier.predict` returns: one row per image scored, in the order
    given. ``scores`` are probabilities (the softmax of the method's class scores) over
    ``classes``; ``sources`` name each image (its path, or ``<image i>`` for one given
    in memory); ``unreadable`` holds the images left out, path -> why."""

    sources: list[str]
    scores: torch.Tensor  # [N, C]
    classes: list[str]
    unreadable: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sources)

    @property
    def indices(self) -> list[int]:
        """The predicted class of each image, as an index into :attr:`classes`."""
        return self.scores.argmax(-1).tolist()

    @property
    def names(self) -> list[str]:
        """The predicted class of each image, by name."""
        return [self.classes[i] for i in self.indices]

    def top(self, k: int = 1) -> list[list[tuple[str, float]]]:
        """The ``k`` most likely classes of each image with their scores, best first."""
        values, index = self.scores.topk(min(k, len(self.classes)), dim=-1)
        return [[(self.classes[i], v) for i, v in zip(row_i, row_v)]
                for row_i, row_v in zip(index.tolist(), values.tolist())]

    def records(self, k: int = 1) -> list[dict[str, Any]]:
        """Plain data: ``{"path": ..., "top": [{"class": ..., "score": ...}, ...]}`` per image."""
        return [{"path": source, "top": [{"class": name, "score": score} for name, score in best]}
                for source, best in zip(self.sources, self.top(k))]


class Classifier:
    """A method trained by a run (or zero-shot CLIP), ready to classify images.

    Made by :func:`vlprompt.load` from a results folder or an exported file. It scores
    images as the run scored its test images: the backbone's test transform, the
    run's precision and evaluation batch size, its ``unreadable_images`` policy.
    :meth:`set_classes` scores other class names where the method allows it; a method
    tied to its classes (class-specific contexts) refuses in one line."""

    def __init__(self, method: PromptMethod, classes: ClassSet, settings: TrainSpec, seed: int,
                 about: dict[str, Any], device: torch.device):
        self.method = method.eval()
        self.settings = settings
        self.seed = seed
        #: Where the classifier comes from and what it is (method, label, backbone, run).
        self.about = about
        self.device = torch.device(device)
        self._classes = classes

    @property
    def backbone(self):
        return self.method.backbone

    @property
    def classes(self) -> list[str]:
        """The class names predictions are made over."""
        return list(self._classes.names)

    @property
    def class_set(self) -> ClassSet:
        return self._classes

    @property
    def label(self) -> str:
        return self.about["label"]

    def __repr__(self) -> str:
        return (f"Classifier({self.about['label']!r}: {self.about['method']} seed {self.seed}, "
                f"{len(self._classes)} classes, {self.about.get('backbone_description', '')}, {self.device})")

    # ------------------------------------------------------------------ classes
    def set_classes(self, names: Iterable[str]) -> Classifier:
        """Predict over ``names`` from now on (the dataset's templates stay); returns self.
        Names that read alike in a prompt, fewer than two names, or a method that cannot
        score other classes are a :class:`UserError`."""
        names = [str(n) for n in names]
        problem = class_count_problem("classes", names)
        if problem:
            raise UserError(problem)
        classes = user_classes(names, self._classes.templates, self._classes.ensemble, "classes",
                               "give each class once")
        self._apply(classes)
        return self

    def _apply(self, classes: ClassSet) -> None:
        label = self.about["label"]
        try:
            with torch.no_grad(), text_chunking(self.settings.text_chunk):
                self.method.set_classes(classes)
        except UserError as exc:
            raise UserError(*[f"{label} ({self.about['method']}): {p}" for p in exc.problems]) from None
        self.method.eval()
        self._classes = classes

    def text_features(self, class_names: Iterable[str] | None = None) -> torch.Tensor:
        """L2-normalised class text features ``[C, D]`` (fp32) of ``class_names`` (default:
        :attr:`classes`): an image's class scores are ``logit_scale * normalize(image
        feature) @ text_features.T``. Only for methods that score so, with text features
        that depend on neither the image nor chance (zero-shot, CoOp, ...); others (CoCoOp,
        BPL, CLIP-LoRA, the linear probe, ...) raise :class:`UserError`."""
        current = self._classes
        if class_names is not None:
            self.set_classes(class_names)
        try:
            with torch.no_grad(), text_chunking(self.settings.text_chunk), autocast(self.device,
                                                                                    self.settings.precision):
                features = static_text_features(self.method)
        finally:
            if self._classes is not current:
                self._apply(current)
        if features is None:
            raise UserError(f"{self.about['label']} ({self.about['method']}): its scores are not the frozen image "
                            "features against one fixed text feature per class (they depend on the image, on chance, "
                            "or on weights of its own in the towers or on the image features), so it has no text "
                            "features to give; use predict")
        return F.normalize(features.detach().float(), dim=-1)

    # ------------------------------------------------------------------ device
    def to(self, device: str | torch.device) -> Classifier:
        """Move the backbone and the method to ``device``; returns self."""
        self.device = torch.device(device)
        self.backbone.to(self.device)
        self.method.to(self.device)
        self._apply(self._classes)  # class-dependent state made on the old device
        return self

    # ---------------------------------------------------------------- predict
    @property
    def transform(self):
        """The test transform images go through (as a run's test images)."""
        b = self.backbone
        return test_transform(b.image_size, b.image_mean, b.image_std)

    def predict(self, images: ImageInput | Iterable[ImageInput], unreadable: str | None = None,
                progress: ProgressReporter | None = None) -> Predictions:
        """Class scores of ``images``: paths, PIL images, tensors (``[3, H, W]`` or
        ``[N, 3, H, W]``, values in [0, 1] or uint8; resized, cropped and normalised as
        files are), or a list of them. An image file that cannot be read stops with a
        one-line :class:`UserError`, or is left out and named in
        :attr:`Predictions.unreadable` when ``unreadable`` (default: the run's
        ``train.unreadable_images``) is ``"skip"``."""
        policy = unreadable or self.settings.unreadable_images
        if policy not in ("error", "skip"):
            raise UserError(f"unreadable: {policy!r} is neither 'error' nor 'skip'")
        inputs = list(_each_image(images))
        progress = progress or ProgressReporter()
        bs = self.settings.eval_batch_size
        sources: list[str] = []
        scores: list[torch.Tensor] = []
        left_out: dict[str, str] = {}
        task = progress.start(f"{self.about['label']}: predict", -(-len(inputs) // bs))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)  # methods that draw noise (BPL) predict the same every time
            for start in range(0, len(inputs), bs):
                pixels = []
                for i, image in enumerate(inputs[start : start + bs], start):
                    name, pixel = self._pixels(image, i)
                    if isinstance(pixel, Unreadable):
                        if policy == "error":
                            raise UserError(f"{pixel.message()}; leave it out, or skip unreadable images "
                                            "(--unreadable skip)")
                        left_out[name] = pixel.reason
                        continue
                    sources.append(name)
                    pixels.append(pixel)
                if pixels:
                    scores.append(self._score(torch.stack(pixels)))
                progress.advance(task, 1)
        progress.stop(task)
        if not scores:
            if inputs:
                raise UserError(f"none of the {len(inputs)} images could be read")
            raise UserError("no images to classify")
        probabilities = torch.cat(scores).float().softmax(-1).cpu()
        return Predictions(sources, probabilities, self.classes, left_out)

    def _pixels(self, image: ImageInput, i: int) -> tuple[str, torch.Tensor | Unreadable]:
        """``(name, the test transform's tensor)`` of one image, or why it cannot be read."""
        if isinstance(image, (str, os.PathLike)):
            rgb = read_rgb(Path(image))
            return str(image), rgb if isinstance(rgb, Unreadable) else self.transform(rgb)
        if isinstance(image, Image.Image):
            return f"<image {i}>", self.transform(_to_rgb(image))
        if isinstance(image, torch.Tensor):
            if image.dtype == torch.uint8:
                image = image.float() / 255
            from torchvision import transforms as T

            on_tensors = T.Compose([t for t in self.transform.transforms if not isinstance(t, T.ToTensor)])
            return f"<image {i}>", on_tensors(image.float().cpu())
        raise TypeError(f"image {i}: a path, a PIL image or a tensor, not {type(image).__name__}")

    @torch.no_grad()
    def _score(self, pixels: torch.Tensor) -> torch.Tensor:
        """The method's class scores ``[B, C]`` of a batch of transformed images, computed
        as a run's evaluation does (frozen features in fp32, the run's precision)."""
        method, precision = self.method, self.settings.precision
        with text_chunking(self.settings.text_chunk):
            with autocast(self.device, precision):
                batch = make_batch(method, pixels.to(self.device), None)
            if batch.image_features is not None:
                batch.image_features = batch.image_features.float()
            with autocast(self.device, precision):
                scores = method.predict(forward(method, batch))
        check_scores(method, scores, batch, len(self._classes))
        return scores.float()


def _each_image(images) -> Iterator[ImageInput]:
    """One image at a time: a batch tensor ``[N, 3, H, W]`` is N images."""
    if isinstance(images, (str, os.PathLike, Image.Image)):
        yield images
    elif isinstance(images, torch.Tensor):
        if images.dim() == 4:
            yield from images
        elif images.dim() == 3:
            yield images
        else:
            raise TypeError(f"an image tensor is [3, H, W] or [N, 3, H, W], not {list(images.shape)}")
    else:
        for image in images:
            if isinstance(image, torch.Tensor) and image.dim() == 4:
                yield from image
            else:
                yield image


def static_text_features(method: PromptMethod) -> torch.Tensor | None:
    """The current classes' text features of a method whose text depends on neither the
    image nor chance, or None: a method exposes them as ``text_features()`` (CoOp and
    the methods built like it) or as a ``text_features`` tensor (zero-shot CLIP)."""
    if method.per_image_text:
        return None
    found = getattr(method, "text_features", None)
    if callable(found):
        return found()
    return found if isinstance(found, torch.Tensor) else None
