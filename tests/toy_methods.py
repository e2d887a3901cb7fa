"""Toy methods that exercise the method contract (registered in-process by tests)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlprompt_core import hookimpl
from vlprompt_core.api import Batch, MethodEntry, MethodOutput, Options, ParamGroup, PromptMethod
from vlprompt_core.prompting import PromptTable, PromptTemplate, class_text_features, init_context
from vlprompt_core.recipes import Recipe, RecipeRule
from vlprompt_kernels import cosine_logits


class VisualOptions(Options):
    n_prompts: int = 2
    reg_weight: float = 0.1


class ToyVisualPrompt(PromptMethod):
    """VPT-shallow: learned tokens after the class token, before block 0 (after the
    pre-norm), a frozen hand-written classifier, and a pull of the prompted feature
    towards the frozen feature of the same augmented image."""

    inputs = ("images", "image_features")
    requires = ("vision_transformer",)

    def __init__(self, backbone, classes, options: VisualOptions):
        super().__init__(backbone, classes, options)
        self.prompts = nn.Parameter(0.02 * torch.randn(options.n_prompts, backbone.vision_width))
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (images, frozen features) per forward
        self.set_classes(classes)

    def set_classes(self, classes):
        self.text = class_text_features(self.backbone, classes.names, classes.templates[:1])

    def forward(self, batch: Batch) -> MethodOutput:
        bb = self.backbone
        self.seen.append((batch.images, batch.image_features))
        x = bb.embed_image(batch.images)
        prompts = self.prompts.to(x.dtype).expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :1], prompts, x[:, 1:]], dim=1)
        feats = bb.encode_image_tokens(x).float()
        logits = cosine_logits(feats, self.text, bb.logit_scale)
        pull = (F.normalize(feats, dim=-1) - F.normalize(batch.image_features.float(), dim=-1)).pow(2).sum(-1).mean()
        return MethodOutput(logits, losses={"pull": self.options.reg_weight * pull})


class HooksOptions(Options):
    n_ctx: int = 2
    head_lr_scale: float = 10.0


class ToyHooks(PromptMethod):
    """A CoOp-like context plus a per-class bias 'head' with its own learning rate
    and no weight decay, a hinge loss instead of cross-entropy, a prediction rule
    that is not the arg-max of the logits, and an epoch-end record."""

    def __init__(self, backbone, classes, options: HooksOptions):
        super().__init__(backbone, classes, options)
        self.ctx = nn.Parameter(init_context(backbone, options.n_ctx))
        self.head = nn.Parameter(torch.zeros(len(classes)))
        self.template = PromptTemplate.with_context(options.n_ctx)
        self.epochs_seen: list[tuple[int, int, float]] = []
        self.losses_seen: list[float] = []
        self.predicted: list[torch.Tensor] = []
        self.set_classes(classes)

    def set_classes(self, classes):
        self.prompts = PromptTable(self.backbone, classes.names, self.template)
        self.calls_since_classes = 0

    def parameter_groups(self):
        return [ParamGroup([self.ctx]), ParamGroup([self.head], lr_scale=self.options.head_lr_scale, weight_decay=0.0)]

    def forward(self, batch):
        text = self.cached("text", lambda: self.prompts.encode(self.backbone, self.ctx))
        logits = cosine_logits(batch.image_features.float(), text.float(), self.backbone.logit_scale)
        if logits.shape[1] == self.head.shape[0]:
            logits = logits + self.head
        return MethodOutput(logits)

    def loss(self, output, batch):
        # multi-class hinge loss (not cross-entropy)
        loss = F.multi_margin_loss(output.logits.float(), batch.labels)
        self.losses_seen.append(float(loss.detach()))
        return loss

    def predict(self, output):
        scores = -output.logits  # the arg-min of the logits: visibly not the default rule
        self.predicted.append(scores.argmax(-1))
        return scores

    def on_epoch_end(self, epoch, epochs):
        self.epochs_seen.append((epoch, epochs, float(self.ctx.detach().abs().sum())))


class RecipeOptions(Options):
    width: int = 1
    mode: str = "a"


class ToyRecipeMethod(PromptMethod):
    def __init__(self, backbone, classes, options):
        super().__init__(backbone, classes, options)
        self.scale = nn.Parameter(torch.ones(()))
        self.set_classes(classes)

    def set_classes(self, classes):
        self.text = class_text_features(self.backbone, classes.names, classes.templates[:1])

    def forward(self, batch):
        return MethodOutput(self.scale * cosine_logits(batch.image_features.float(), self.text, 1.0))


TOY_RECIPE = Recipe(
    train={"lr": 0.1, "epochs": 3, "batch_size": 2},
    options={"width": 4},
    rules=[
        RecipeRule(when={"protocol": "few_shot", "shots": [1, 2]}, train={"epochs": 5}, options={"mode": "b"}),
        RecipeRule(when={"dataset": "toy_shift"}, train={"epochs": 7}),
    ],
    source="made up for tests",
)


class Plugin:
    """The toys' hook implementations (``make_plugin_manager(extra=(("toys", Plugin()),))``)."""

    @hookimpl
    def vlprompt_methods(self):
        return [
            MethodEntry("toy_visual", VisualOptions, ToyVisualPrompt, "toy visual prompts"),
            MethodEntry("toy_hooks", HooksOptions, ToyHooks, "toy training hooks"),
            MethodEntry("toy_recipe", RecipeOptions, ToyRecipeMethod, "toy recipe", TOY_RECIPE),
        ]
