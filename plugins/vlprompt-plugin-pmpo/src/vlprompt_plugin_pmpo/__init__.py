"""PMPO: "Multi-Prompt with Depth Partitioned Cross-Modal Learning" (Tian, Wang, Guo,
Zhu, Chen; arXiv 2305.06221) — a **reconstruction**: no code and no method section of
the paper are public (see the README for what rests on which evidence).

N learned text prompts; the image tower's first ``prompt_depth`` blocks are split into
N contiguous groups, and prompt i is coupled to group i by a linear map from its
context vectors to visual prompt tokens. One image pass carries all groups' visual
prompts; each text prompt gets its own text-tower pass; the class scores of the N
prompts are averaged, with a prior from hand-written templates.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from vlprompt_core import hookimpl
from vlprompt_core.api import EffectiveOptions, Batch, ClassSet, MethodEntry, MethodOutput, Options, PromptMethod
from vlprompt_core.errors import UserError
from vlprompt_core.prompting import (
    Context,
    PromptTable,
    PromptTemplate,
    TemplateChoice,
    check_templates,
    class_text_features,
    templates_for,
)
from vlprompt_core.recipes import Recipe
from vlprompt_kernels import cosine_logits


class PMPOOptions(Options):
    """``method: {name: pmpo, ...}``; every open design choice is an option (README)."""

    n_prompts: int = Field(2, ge=1, description="number of learned text prompts N (= depth groups)")
    n_ctx: int = Field(2, ge=1, description="learned context vectors per prompt (= visual tokens per group)")
    ctx_init: str = Field(
        "", description="initialise every prompt from these words (the first n_ctx are learned, the rest stay "
        "fixed words); '' for random N(0, 0.02^2) contexts")
    prompt_depth: int | None = Field(
        None, ge=1, description="image blocks that get coupled prompts, from the first (default: all)")
    group_starts: list[int] | None = Field(
        None, description="first block of each group (ascending, starting at 0; default: equal contiguous groups)")
    insertion: Literal["group_start", "every_block"] = Field(
        "group_start", description="write group i's visual tokens once, at its first block, or before every "
        "block of the group")
    coupling: Literal["per_prompt", "shared"] = Field(
        "per_prompt", description="one linear text->vision map per prompt, or one shared by all")
    combine: Literal["mean_logits", "mean_features", "mean_probs"] = Field(
        "mean_logits", description="how the prompts' class scores are averaged")
    prior: Literal["ensemble", "loss", "both", "none"] = Field(
        "none", description="the hand-written templates' class features as an extra ensemble member, as a "
        "consistency loss on each prompt's class features, both, or neither")
    prior_weight: float = Field(
        0.2, ge=0, le=1, description="weight of the prior member in the ensemble (the N prompts share the rest)")
    prior_loss_weight: float = Field(1.0, ge=0, description="weight of the consistency loss (KgCoOp's form)")
    prior_templates: TemplateChoice = Field("ensemble", description="templates of the prior: 'dataset', 'ensemble' or a list")

    _has_slot = field_validator("prior_templates")(check_templates)

    @model_validator(mode="after")
    def _groups(self):
        if self.group_starts is not None:
            g = self.group_starts
            if len(g) != self.n_prompts or g[0] != 0 or any(b <= a for a, b in zip(g, g[1:])):
                raise ValueError("group_starts needs one ascending start block per prompt, the first 0")
        return self


def equal_groups(depth: int, n: int) -> list[int]:
    """Start blocks of ``n`` contiguous groups covering ``depth`` blocks, sizes differing by
    at most one (the first groups get the extra blocks)."""
    if n > depth:
        raise UserError(f"method.n_prompts: {n} prompts need at least {n} prompted image blocks, got {depth}")
    size, extra = divmod(depth, n)
    starts, b = [], 0
    for i in range(n):
        starts.append(b)
        b += size + (i < extra)
    return starts


def _not_whole_words(n_ctx: int, words: str) -> str:
    return f"method.ctx_init: the first n_ctx = {n_ctx} tokens of {words!r} must be whole words"


def _beyond(start: int, depth: int) -> str:
    return f"method.group_starts: block {start} is beyond the {depth} prompted blocks"


class PMPO(PromptMethod):
    inputs = ("images",)
    requires = ("vision_transformer",)

    @classmethod
    def effective_options(cls, options, backbone):
        """``prompt_depth`` (at most the image tower's depth) and ``group_starts`` as used;
        prompts or groups the prompted blocks cannot hold, and a ``ctx_init`` whose first
        ``n_ctx`` tokens are not whole words, refused before the run."""
        o, notes, used = options, [], {}
        if o.ctx_init and backbone.word_tokens is not None:
            words = o.ctx_init.split()
            counts = [backbone.word_tokens(" ".join(words[:k])) for k in range(len(words) + 1)]
            if o.n_ctx not in counts:
                raise UserError(_not_whole_words(o.n_ctx, o.ctx_init))
        depth = backbone.vision_depth
        if not depth:
            return EffectiveOptions(options)
        used["prompt_depth"] = min(o.prompt_depth or depth, depth)
        if o.prompt_depth and used["prompt_depth"] < o.prompt_depth:
            notes.append(f"prompt_depth {o.prompt_depth} -> {depth}: the image tower has {depth} blocks")
        used["group_starts"] = o.group_starts or equal_groups(used["prompt_depth"], o.n_prompts)
        if used["group_starts"][-1] >= used["prompt_depth"]:
            raise UserError(_beyond(used["group_starts"][-1], used["prompt_depth"]))
        return EffectiveOptions(o.model_copy(update=used), tuple(notes))

    def __init__(self, backbone, classes: ClassSet, options: PMPOOptions):
        super().__init__(backbone, classes, options)
        backbone.require("vision_transformer", "method 'pmpo'")
        o, bb = options, backbone
        device = bb.positional_embedding.device
        n, m = o.n_prompts, o.n_ctx
        if o.ctx_init:
            # MaPLe's layout: the first n_ctx tokens of the words are learned, the rest stay words
            words = o.ctx_init.split()
            k = next((k for k in range(len(words) + 1) if len(bb.tokenize_words(" ".join(words[:k]))) >= m), None)
            learned = bb.tokenize_words(" ".join(words[:k])) if k is not None else []
            if len(learned) != m:
                raise UserError(_not_whole_words(m, o.ctx_init))
            with torch.no_grad():
                init = bb.embed_tokens(torch.tensor(learned, device=device)).float()
            ctx = init[None].repeat(n, 1, 1)
            fixed = " ".join(words[k:])
            self.template = PromptTemplate(Context(0, m), *([fixed] if fixed else []), "{}", ".")
        else:
            ctx = torch.empty(n, m, bb.text_width, device=device).normal_(0, 0.02)
            self.template = PromptTemplate.with_context(m)
        self.ctx = nn.Parameter(ctx)  # [N, M, text width]
        n_maps = n if o.coupling == "per_prompt" else 1
        self.couplings = nn.ModuleList(nn.Linear(bb.text_width, bb.vision_width) for _ in range(n_maps)).to(device)
        depth = min(o.prompt_depth or bb.vision_depth, bb.vision_depth)
        starts = o.group_starts or equal_groups(depth, n)
        if starts[-1] >= depth:
            raise UserError(_beyond(starts[-1], depth))
        self.group_of_block = [max(i for i, s in enumerate(starts) if s <= b) for b in range(depth)]
        self.group_starts = starts
        self.set_classes(classes)

    def set_classes(self, classes: ClassSet) -> None:
        self.prompts = PromptTable(self.backbone, classes.names, self.template)
        if self.options.prior != "none":
            self.prior_features = class_text_features(
                self.backbone, classes.names, templates_for(self.options.prior_templates, classes))

    # ----------------------------------------------------------------- pieces
    def visual_prompts(self) -> torch.Tensor:
        """``[N, M, vision width]``: each prompt's context through its coupling map."""
        maps = self.couplings if len(self.couplings) > 1 else [self.couplings[0]] * len(self.ctx)
        return torch.stack([f(c) for f, c in zip(maps, self.ctx)])

    def text_features(self) -> torch.Tensor:
        """``[N, C, D]``: the class features under each prompt."""
        return self.prompts.encode(self.backbone, self.ctx[:, None])

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """One image pass with group i's visual tokens in the slots while its blocks run."""
        bb, m = self.backbone, self.options.n_ctx
        visual = self.visual_prompts()
        x = bb.embed_image(images, pre_norm=False)
        x = torch.cat([x, visual[0].to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)  # appended, before the norm
        x = bb.vision_pre_norm(x)
        every = self.options.insertion == "every_block"

        def hook(block: int, t: torch.Tensor) -> torch.Tensor:
            if block == 0 or block >= len(self.group_of_block):
                return t
            g = self.group_of_block[block]
            if block != self.group_starts[g] and not every:
                return t
            return torch.cat([t[:, :-m], visual[g].to(t.dtype).expand(t.shape[0], -1, -1)], dim=1)

        return bb.encode_image_tokens(x, block_hook=hook)

    # ---------------------------------------------------------------- forward
    def forward(self, batch: Batch) -> MethodOutput:
        o, scale = self.options, self.backbone.logit_scale
        f = F.normalize(self.image_features(batch.images).float(), dim=-1)
        text = self.cached("text_features", self.text_features).float()  # [N, C, D]
        n = len(text)
        w_prior = o.prior_weight if o.prior in ("ensemble", "both") else 0.0
        weights = [(1 - w_prior) / n] * n
        members = list(text)
        if w_prior > 0:
            members.append(self.prior_features.to(f.device))
            weights.append(w_prior)
        if o.combine == "mean_features":
            mixed = sum(w * F.normalize(t, dim=-1) for w, t in zip(weights, members))
            scores = cosine_logits(f, mixed, scale)
        else:
            per = torch.stack([cosine_logits(f, t, scale) for t in members])  # [members, B, C]
            w = torch.tensor(weights, device=f.device)[:, None, None]
            if o.combine == "mean_logits":
                scores = (w * per).sum(0)
            else:  # log of the weighted mean of probabilities
                scores = torch.logsumexp(per.log_softmax(-1) + w.log(), dim=0)
        losses = {}
        if self.training and o.prior in ("loss", "both") and o.prior_loss_weight > 0:
            cos = (F.normalize(text, dim=-1) * self.prior_features.to(f.device)[None]).sum(-1)  # [N, C]
            losses["prior"] = o.prior_loss_weight * (1 - cos).mean()
        return MethodOutput(scores, losses=losses)


#: No recipe is published. MaPLe's base-to-novel recipe (the closest published relative:
#: SGD lr 0.0035, batch 4, 5 epochs), an inference, not PMPO's.
RECIPE = Recipe(
    train={"optimizer": "sgd", "lr": 0.0035, "batch_size": 4, "epochs": 5, "momentum": 0.9,
           "weight_decay": 5e-4, "warmup_epochs": 1, "warmup_lr": 1e-5},
    source="no PMPO recipe is public; MaPLe's (muzairkhattak/multimodal-prompt-learning "
    "configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml), as an assumption",
)


@hookimpl
def vlprompt_methods() -> list[MethodEntry]:
    return [MethodEntry("pmpo", PMPOOptions, PMPO,
                        "PMPO (reconstruction): N text prompts coupled to depth partitions of the image tower", RECIPE)]
