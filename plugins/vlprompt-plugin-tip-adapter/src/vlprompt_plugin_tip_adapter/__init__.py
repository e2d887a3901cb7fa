"""Tip-Adapter and Tip-Adapter-F: "Tip-Adapter: Training-free Adaption of CLIP for
Few-shot Classification" (Zhang, Zhang, Fang, Gao, Li, Dai, Qiao, Li; ECCV 2022).

Zero-shot CLIP plus a key-value cache of the few-shot training images: the keys are their
frozen image features (each the mean of ``augment_epoch`` augmented views, normalised),
the values their one-hot labels. An image with unit feature ``f`` scores

    logits = scale · f Wᵀ + alpha · exp(-beta (1 - f Kᵀ)) V

(``W`` the classes' hand-written prompt features, ``scale`` 100). ``alpha`` and ``beta`` are
searched on the validation split. Tip-Adapter (``tip_adapter``) trains nothing; Tip-Adapter-F
(``tip_adapter_f``) trains the keys ``K`` by gradient steps (the official code's linear
``adapter`` initialised with the cache keys), with ``alpha``, ``beta`` at their initial values,
then searches them.

The cache is fitted in :meth:`~TipAdapter.before_training` and the search runs in
:meth:`~TipAdapter.after_training`; both are kept as fitted buffers. The cache remembers its
classes by name: other classes (novel ones, a transfer target's) get no vote from it, so on
classes it never saw the method is zero-shot CLIP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from vlprompt_core import hookimpl
from vlprompt_core.api import (
    Batch,
    ClassSet,
    FrozenData,
    MethodEntry,
    MethodOutput,
    Options,
    PromptMethod,
    Published,
)
from vlprompt_core.prompting import (
    TemplateChoice,
    check_templates,
    class_text_features,
    names_of,
    names_tensor,
    templates_for,
)
from vlprompt_core.recipes import Recipe, RecipeRule
from vlprompt_kernels import cosine_logits

from .cache import Searched, affinity, cache_keys, one_hot_values, search, search_grid, tip_logits

__all__ = ["TipAdapter", "TipAdapterF", "TipAdapterOptions", "TIP_RECIPE", "TIP_F_RECIPE", "Searched",
           "cache_keys", "search", "search_grid", "encode_names", "decode_names", "columns_for"]


class TipAdapterOptions(Options):
    """``method: {name: tip_adapter | tip_adapter_f, ...}`` (defaults: the official ImageNet
    config; the recipe sets each dataset's)."""

    augment_epoch: int = Field(10, ge=1, le=1000, description="augmented views of each training image whose mean "
                               "feature is its cache key (the official augment_epoch)")
    init_beta: float = Field(1.0, ge=0, description="beta (sharpness of the affinity) before the search, and while "
                             "Tip-Adapter-F trains")
    init_alpha: float = Field(1.17, ge=0, description="alpha (weight of the cache's scores) before the search, and "
                              "while Tip-Adapter-F trains")
    search: bool = Field(True, description="search beta and alpha on the validation split (the official search_hp); "
                         "false: keep init_beta, init_alpha")
    search_scale: tuple[float, float] = Field(
        (7.0, 3.0), description="[beta, alpha]: each is searched from 0.1 up to (not including) this value")
    search_step: tuple[int, int] = Field((200, 20), description="[beta, alpha]: how many values of each are tried")
    templates: TemplateChoice = Field(
        "dataset", description="the hand-written prompt(s) of the zero-shot classifier: 'dataset', 'ensemble' or a "
        "list with '{}' (the recipe sets ImageNet's 7-template ensemble)")
    clip_scale: float = Field(100.0, gt=0, description="the scale of the zero-shot CLIP logits (the official code "
                              "writes 100, CLIP's own)")

    _has_slot = field_validator("templates")(check_templates)

    @field_validator("search_scale")
    @classmethod
    def _positive_scale(cls, value: tuple[float, float]) -> tuple[float, float]:
        if min(value) <= 0:
            raise ValueError(f"both ends must be above 0, got {list(value)}")
        return value

    @field_validator("search_step")
    @classmethod
    def _steps(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not all(1 <= v <= 100_000 for v in value):
            raise ValueError(f"each count must be from 1 to 100,000, got {list(value)}")
        return value


#: Class names as a byte tensor (JSON, UTF-8), so that a checkpoint holds them: the core's
#: :func:`~vlprompt_core.prompting.names_tensor`, exported under this name too.
encode_names = names_tensor
#: The names :func:`encode_names` encoded: the core's :func:`~vlprompt_core.prompting.names_of`.
decode_names = names_of


def _occurrences(names: list[str]) -> list[tuple[str, int]]:
    """Each name with how often it came before (two classes may share a name, as
    ImageNet's two 'missile' classes do)."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        out.append((n, seen.get(n, 0)))
        seen[n] = seen.get(n, 0) + 1
    return out


def columns_for(cached: list[str], current: list[str]) -> torch.Tensor:
    """For each cached class, its column among ``current`` (by name; the k-th class of a
    repeated name is the k-th of that name), or -1 when ``current`` has no such class."""
    where = {key: i for i, key in enumerate(_occurrences(current))}
    return torch.tensor([where.get(key, -1) for key in _occurrences(cached)], dtype=torch.long)


class TipAdapter(PromptMethod):
    """Tip-Adapter: the cache is fitted, nothing trains."""

    inputs = ("image_features",)
    #: Whether the cache keys train (Tip-Adapter-F).
    trains_keys = False

    def __init__(self, backbone, classes: ClassSet, options: TipAdapterOptions):
        super().__init__(backbone, classes, options)
        device = backbone.positional_embedding.device
        placeholder = torch.zeros(0, backbone.embed_dim, device=device)
        # [N, D]: unit rows (trained ones in Tip-Adapter-F); N comes from before_training
        self.register_fitted("cache_keys", nn.Parameter(placeholder) if self.trains_keys else placeholder)
        self.register_fitted("cache_labels", torch.zeros(0, dtype=torch.long, device=device))  # [N]
        self.register_fitted("cache_classes", names_tensor([]))  # the names cache_labels index
        # float64: the grid's values exactly as searched (the arithmetic runs in fp32)
        self.register_fitted("alpha", self._scalar(options.init_alpha, device))
        self.register_fitted("beta", self._scalar(options.init_beta, device))
        self._values: tuple | None = None
        self.set_classes(classes)

    def set_classes(self, classes: ClassSet) -> None:
        self.class_names = list(classes.names)
        text = class_text_features(self.backbone, self.class_names, templates_for(self.options.templates, classes))
        self.register_buffer("text", text, persistent=False)  # [C, D] unit, frozen

    @staticmethod
    def _scalar(value: float, device) -> torch.Tensor:
        return torch.tensor(float(value), dtype=torch.float64, device=device)

    # ----------------------------------------------------------------- cache
    def values(self) -> torch.Tensor:
        """``[N, C]``: the cache's one-hot labels over the current classes (all-zero rows
        for cached classes that are not among them)."""
        key = (self.cache_labels, self.cache_classes, tuple(self.class_names))
        if self._values is None or any(a is not b for a, b in zip(self._values[:2], key[:2])) \
                or self._values[2] != key[2]:
            cols = columns_for(names_of(self.cache_classes), self.class_names)
            self._values = (*key, one_hot_values(self.cache_labels, cols, len(self.class_names)))
        return self._values[3]

    def scores(self, image_features: torch.Tensor, alpha, beta) -> torch.Tensor:
        """Tip-Adapter's logits ``[B, C]`` for raw image features, in fp32 (the cache's
        exponent magnifies rounding by beta)."""
        with torch.autocast(image_features.device.type, enabled=False):
            img = F.normalize(image_features.float(), dim=-1)
            clip = cosine_logits(img, self.text.float(), self.options.clip_scale)
            aff = affinity(img, self.cache_keys.float())
            return tip_logits(clip, aff, self.values().to(img.device), alpha, beta)

    def forward(self, batch: Batch) -> MethodOutput:
        if self.training:  # the official training loop scores with the initial alpha and beta
            alpha, beta = self.options.init_alpha, self.options.init_beta
        else:
            alpha, beta = self.alpha.item(), self.beta.item()
        return MethodOutput(self.scores(batch.image_features, alpha, beta))

    # ----------------------------------------------------------------- fitting
    @torch.no_grad()
    def before_training(self, data: FrozenData) -> None:
        """The cache: keys from ``augment_epoch`` augmented views of every training image,
        values their labels (over ``data.classes``)."""
        train = data.train(views=self.options.augment_epoch)
        keys = cache_keys(train.features)
        if self.trains_keys:
            self.cache_keys.data = keys.to(self.cache_keys.device)
        else:
            self.cache_keys = keys
        self.cache_labels = train.labels.long().to(keys.device)
        self.cache_classes = names_tensor(list(data.classes.names))
        self.alpha = self._scalar(self.options.init_alpha, keys.device)
        self.beta = self._scalar(self.options.init_beta, keys.device)

    @torch.no_grad()
    def after_training(self, data: FrozenData) -> None:
        """The official search_hp on the validation split: alpha and beta that classify
        most validation images correctly (kept at their initial values when ``search`` is
        off or the split is empty)."""
        if not self.options.search:
            return
        val = data.val()
        if len(val) == 0:
            return
        img = F.normalize(val.features.float(), dim=-1)
        clip = cosine_logits(img, self.text.float(), self.options.clip_scale)
        aff = affinity(img, self.cache_keys.detach().float())
        found = search(clip, aff, self.values().to(img.device), val.labels.to(img.device),
                       self.options.search_scale, self.options.search_step)
        self.alpha = self._scalar(found.alpha, img.device)
        self.beta = self._scalar(found.beta, img.device)


class TipAdapterF(TipAdapter):
    """Tip-Adapter-F: the cache keys train (``[N, D]``, initialised with the cache's);
    with ``train.epochs: 0`` it is Tip-Adapter."""

    trains_keys = True


# ------------------------------------------------------------------- recipes
#: gaopengcuhk/Tip-Adapter configs/<dataset>.yaml: search_scale [beta, alpha] and init_alpha
#: (init_beta is 1, search_step [200, 20], augment_epoch 10, lr 0.001 everywhere).
CONFIGS = {
    "imagenet": ((7, 3), 1.17),
    "caltech101": ((12, 5), 3),
    "dtd": ((13, 13), 2),
    "eurosat": ((12, 10), 2),
    "fgvc_aircraft": ((30, 30), 5),
    "food101": ((10, 10), 1.17),
    "oxford_flowers": ((50, 50), 10),
    "oxford_pets": ((7, 3), 1.17),
    "stanford_cars": ((20, 10), 3),
    "sun397": ((12, 10), 1.17),
    "ucf101": ((7, 3), 3),
}

OPTION_RULES = [
    *[RecipeRule(when={"dataset": name}, options={"search_scale": list(scale), "init_alpha": alpha})
      for name, (scale, alpha) in CONFIGS.items()],
    # datasets/imagenet.py: the 7 templates alone (the dataset's "ensemble"); elsewhere the
    # dataset's own template (datasets/<name>.py, the same as vlprompt's)
    RecipeRule(when={"dataset": "imagenet"}, options={"templates": "ensemble"}),
]
OPTIONS = {"augment_epoch": 10, "init_beta": 1.0, "search_step": [200, 20]}
SOURCE = ("gaopengcuhk/Tip-Adapter (commit d0e2d6f) configs/*.yaml, main.py (train_tranform: RandomResizedCrop "
          "scale (0.5, 1), flip), utils.py (build_cache_model, search_hp), datasets/imagenet.py (templates)")

#: Tip-Adapter: nothing trains. The cache's augmented views use the official crop (scale 0.5-1).
TIP_RECIPE = Recipe(train={"epochs": 0, "crop_scale": [0.5, 1.0]}, options=OPTIONS, rules=OPTION_RULES,
                    source=SOURCE)

#: Tip-Adapter-F: torch.optim.AdamW(lr 0.001, eps 1e-4; weight decay: torch's default 0.01,
#: betas 0.9, 0.999), batch 256, 20 epochs (EuroSAT 100), cosine over every iteration
#: (CosineAnnealingLR, T_max = epochs x iterations, stepped after each), no warm-up, a fresh
#: augmentation every step.
TIP_F_TRAIN = {"optimizer": "adamw", "lr": 0.001, "adam_eps": 1e-4, "weight_decay": 0.01, "batch_size": 256,
               "epochs": 20, "warmup_epochs": 0, "schedule": "cosine", "schedule_per": "step",
               "crop_scale": [0.5, 1.0]}
TIP_F_RECIPE = Recipe(
    train=TIP_F_TRAIN, options=OPTIONS,
    rules=[RecipeRule(when={"dataset": "eurosat"}, train={"epochs": 100}), *OPTION_RULES],
    source=SOURCE + "; main.py run_tip_adapter_F (AdamW, CosineAnnealingLR per iteration, batch 256)",
)


@hookimpl
def vlprompt_methods() -> list[MethodEntry]:
    return [
        MethodEntry("tip_adapter", TipAdapterOptions, TipAdapter,
                    "Tip-Adapter: zero-shot CLIP plus a cache of the few-shot image features (training-free)",
                    TIP_RECIPE, published=Published.load(__name__, "published-tip-adapter.yaml")),
        MethodEntry("tip_adapter_f", TipAdapterOptions, TipAdapterF,
                    "Tip-Adapter-F: Tip-Adapter whose cache keys are fine-tuned", TIP_F_RECIPE,
                    published=Published.load(__name__, "published-tip-adapter-f.yaml")),
    ]
