"""Bayesian prompt learning: "Bayesian Prompt Learning for Image-Language Model
Generalization" (Derakhshani et al., ICCV 2023); official trainer ``VPT`` (variational
prompt tuning) in saic-fi/Bayesian-Prompt-Learning.

CoOp-style context plus a Gaussian residual ``r ~ N(mu, diag sigma^2)`` added to every
context vector, with ``L`` reparameterised Monte-Carlo samples per forward pass:

* unconditional (official ``coopvpt``): ``mu`` and ``log sigma^2`` are free ``[1, width]``
  parameters, so the samples are shared by the whole batch;
* conditional (official ``cocoopvpt``): two small networks map the normalised image
  feature to ``mu(x)`` and ``log sigma^2(x)``: one residual per sample and image. The
  official code runs it at batch 1 only; here any batch size works.

Training minimises ``-mean_b log((1/L) sum_l p(y_b | x_b, r_l)) + kl_weight * KL(q || N(0, I))``
with the KL averaged over dimensions (and over images in the conditional variant); the
prediction is the arg-max of the mean over samples of the class probabilities.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from vlprompt_core import hookimpl
from vlprompt_core.api import Batch, ClassSet, MethodEntry, MethodOutput, Options, PromptMethod
from vlprompt_core.prompting import PromptTable, PromptTemplate, init_context
from vlprompt_core.prompting.settle import settle_context
from vlprompt_core.recipes import Recipe, RecipeRule
from vlprompt_kernels import cosine_logits


class BPLOptions(Options):
    """``method: {name: bpl, ...}`` (defaults: the published ``vit_b16_c4_ep10_batch1_ctxv1`` config)."""

    n_ctx: int = Field(4, ge=1, description="number of context vectors M (ignored when ctx_init is set)")
    ctx_init: str = Field("a photo of a", description="initialise the context from these words ('' for random)")
    init_std: float = Field(0.02, gt=0, description="std of the random N(0, std^2) initialisation")
    conditional: bool = Field(
        False, description="residual distribution from the image feature (official 'cocoopvpt'); "
        "false: one free distribution (official 'coopvpt', the published config)")
    n_samples: int = Field(10, ge=1, description="Monte-Carlo samples L, in training and at test time")
    kl_weight: float = Field(0.001, ge=0, description="weight of the KL term")


def inference_block(inputs: int, hidden: int, outputs: int) -> nn.Sequential:
    """Linear, ELU, Linear, ELU, Linear (the official ``InferenceBlock``)."""
    return nn.Sequential(OrderedDict([
        ("linear1", nn.Linear(inputs, hidden)), ("elu1", nn.ELU()),
        ("linear2", nn.Linear(hidden, hidden)), ("elu2", nn.ELU()),
        ("linear3", nn.Linear(hidden, outputs)),
    ]))


def log_mean_probability(log_p: torch.Tensor) -> torch.Tensor:
    """``log((1/L) sum_l p_l)`` from per-sample log-probabilities ``[L, ...]``."""
    return torch.logsumexp(log_p, dim=0) - math.log(log_p.shape[0])


def gaussian_kl(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, sigma^2) || N(0, 1))`` averaged over the last dimension:
    ``mean_d (sigma^2 + mu^2 - 1 - log sigma^2) / 2``."""
    return 0.5 * (log_var.exp() + mu.pow(2) - 1.0 - log_var).mean(-1)


class BPL(PromptMethod):
    inputs = ("image_features",)

    @classmethod
    def effective_options(cls, options, backbone):
        """``n_ctx`` as ``ctx_init`` makes it (one vector per token); an ``n_ctx`` the words contradict is refused."""
        return settle_context(options, backbone)

    def __init__(self, backbone, classes: ClassSet, options: BPLOptions):
        super().__init__(backbone, classes, options)
        width, device = backbone.text_width, backbone.positional_embedding.device
        self.ctx = nn.Parameter(init_context(backbone, options.n_ctx, options.ctx_init, options.init_std))
        if options.conditional:
            hidden = max(backbone.embed_dim // 2, 1)
            self.mean_net = inference_block(backbone.embed_dim, hidden, width).to(device)
            self.log_var_net = inference_block(backbone.embed_dim, hidden, width).to(device)
        else:
            self.mu = nn.Parameter(torch.zeros(1, width, device=device))
            # the official "std" parameter is used as the log-variance: sigma starts in [1, 1.65]
            self.log_var = nn.Parameter(torch.rand(1, width, device=device))
        self.template = PromptTemplate.with_context(self.ctx.shape[0])
        self.set_classes(classes)

    def set_classes(self, classes: ClassSet) -> None:
        self.prompts = PromptTable(self.backbone, classes.names, self.template)

    def posterior(self, image_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, log sigma^2)``: ``[1, width]`` each, or ``[B, width]`` when conditional."""
        if self.options.conditional:
            f = F.normalize(image_features.float(), dim=-1)
            return self.mean_net(f).float(), self.log_var_net(f).float()
        return self.mu, self.log_var

    def draw(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Standard normal noise, one draw per forward pass from torch's default (CPU)
        generator in fp32, exactly as the official code draws it."""
        return torch.randn(shape)

    def forward(self, batch: Batch) -> MethodOutput:
        feats = F.normalize(batch.image_features.float(), dim=-1)
        mu, log_var = self.posterior(feats)
        L = self.options.n_samples
        eps = self.draw((L, *mu.shape)).to(mu.device, mu.dtype)
        residual = mu[None] + eps * log_var.exp().sqrt()[None]  # [L, 1 or B, width]
        ctx = self.ctx + residual[:, :, None, :]  # [L, 1 or B, M, width]
        text = self.prompts.encode(self.backbone, ctx[:, :, None])
        n, b, c = L, feats.shape[0], len(self.prompts)
        scale = self.backbone.logit_scale
        if text.shape[1] == 1:  # one residual per sample, shared by the batch: [C, D] per sample
            logits = torch.stack([cosine_logits(feats, text[i, 0].float(), scale) for i in range(n)])
        else:  # one per sample and image: [L*B, C, D]
            logits = cosine_logits(feats.repeat(n, 1), text.float().reshape(n * b, c, -1), scale).view(n, b, c)
        log_p = logits.log_softmax(-1)  # [L, B, C]
        mean_log_prob = log_mean_probability(log_p)  # [B, C]
        kl = gaussian_kl(mu, log_var).mean()
        return MethodOutput(mean_log_prob, losses={"kl": self.options.kl_weight * kl}, extras={"log_p": log_p})

    def loss(self, output: MethodOutput, batch: Batch) -> torch.Tensor:
        """``-mean_b [logsumexp_l log p_l(y_b) - log L] + kl_weight * KL``."""
        log_p = output.extras["log_p"].float()
        n = log_p.shape[0]
        likelihood = log_p.gather(-1, batch.labels[None, :, None].expand(n, -1, 1)).squeeze(-1)  # [L, B]
        task = -log_mean_probability(likelihood).mean()
        return task + output.losses["kl"]
    # predict: the default, output.logits = log of the mean of per-sample probabilities


_DATASETS = {  # (Monte-Carlo samples, epochs) per dataset, base-to-novel (VPT.md)
    "caltech101": (20, 20), "oxford_pets": (40, 20), "stanford_cars": (20, 40), "oxford_flowers": (10, 40),
    "food101": (20, 20), "fgvc_aircraft": (10, 10), "sun397": (20, 10), "dtd": (40, 10), "eurosat": (20, 60),
    "ucf101": (5, 20), "imagenet": (10, 10),
}

#: saic-fi/Bayesian-Prompt-Learning ``configs/trainers/VPT/vit_b16_c4_ep10_batch1_ctxv1.yaml``
#: (SGD lr 0.002, batch 1, L 10, MAX_EPOCH 40 unless a script sets it), and the per-dataset L
#: and epochs of ``VPT.md`` / ``scripts/vpt``; ImageNet (the source of cross-dataset and
#: domain-generalisation runs): L 10, 10 epochs.
RECIPE = Recipe(
    train={"optimizer": "sgd", "lr": 0.002, "batch_size": 1, "epochs": 40, "weight_decay": 5e-4,
           "momentum": 0.9, "warmup_epochs": 1, "warmup_lr": 1e-5},
    options={"n_samples": 10},
    rules=[RecipeRule(when={"dataset": name}, train={"epochs": epochs}, options={"n_samples": samples})
           for name, (samples, epochs) in _DATASETS.items()],
    source="saic-fi/Bayesian-Prompt-Learning configs/trainers/VPT/vit_b16_c4_ep10_batch1_ctxv1.yaml, VPT.md",
)


@hookimpl
def vlprompt_methods() -> list[MethodEntry]:
    return [MethodEntry("bpl", BPLOptions, BPL,
                        "Bayesian prompt learning: a Gaussian residual on the context, Monte-Carlo samples", RECIPE)]
