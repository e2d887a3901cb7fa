"""CoOp: "Learning to Prompt for Vision-Language Models" (Zhou et al., IJCV 2022).

M learned context vectors in the token-embedding space replace the words of a
hand-written prompt around the class name; the whole backbone stays frozen and
the only loss is cross-entropy over ``scale * cos(image, text)``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from vlprompt_core import hookimpl
from vlprompt_core.api import ClassSet, MethodOutput, MethodPlugin, Options, PromptMethod
from vlprompt_core.errors import UserError
from vlprompt_kernels import assemble_prompts, cosine_logits


class CoOpOptions(Options):
    """``method: {name: coop, ...}`` (defaults: the reference ``N_CTX=16``, random init)."""

    n_ctx: int = Field(16, ge=1, description="number of context vectors M (ignored when ctx_init is set)")
    ctx_init: str = Field(
        "", description="initialise the context from these words, e.g. 'a photo of a' (M = their token count)"
    )
    class_token_position: Literal["end", "middle", "front"] = Field(
        "end", description="where the class name goes relative to the context"
    )
    csc: bool = Field(False, description="class-specific context: one context per class (random init only)")
    init_std: float = Field(0.02, gt=0, description="std of the random N(0, std^2) initialisation")

    @model_validator(mode="after")
    def _csc_needs_random_init(self):
        if self.csc and self.ctx_init:
            raise ValueError("csc applies to random initialisation only; drop ctx_init or csc")
        return self


class CoOp(PromptMethod):
    modality = "text"

    def __init__(self, backbone, classes: ClassSet, options: CoOpOptions):
        super().__init__(backbone, classes, options)
        width = backbone.text_width
        device = backbone.positional_embedding.device
        if options.ctx_init:
            ids = torch.tensor(backbone.tokenize_words(options.ctx_init), device=device)
            with torch.no_grad():
                ctx = backbone.embed_tokens(ids).float().clone()
        else:
            shape = (len(classes), options.n_ctx, width) if options.csc else (options.n_ctx, width)
            ctx = torch.empty(shape, device=device).normal_(0, options.init_std)
        self.ctx = nn.Parameter(ctx)
        self.n_ctx = ctx.shape[-2]
        self._trained_names = list(classes.names)
        self._placeholder = backbone.tokenize_words("X")[0]  # stands in the context slots
        self._dot = backbone.tokenize_words(".")
        self._cached: torch.Tensor | None = None
        self.set_classes(classes)

    def prompt_layout(self, name_ids: list[int]) -> tuple[list[int], list[int]]:
        """Token ids and context slots (``j`` for context vector j, -1 otherwise) of one
        prompt: ``[SOS] ctx... name... . [EOS]`` with the class name at the chosen position."""
        bb, m = self.backbone, self.n_ctx
        placeholder, dot = self._placeholder, self._dot
        where = self.options.class_token_position
        half = m // 2 if where == "middle" else (m if where == "end" else 0)
        ctx_a, ctx_b = list(range(half)), list(range(half, m))
        body_slots = ctx_a + [-1] * len(name_ids) + ctx_b + [-1] * len(dot)
        body_ids = [placeholder] * len(ctx_a) + name_ids + [placeholder] * len(ctx_b) + dot
        return [bb.sot_id, *body_ids, bb.eot_id], [-1, *body_slots, -1]

    def set_classes(self, classes: ClassSet) -> None:
        if self.options.csc and list(classes.names) != self._trained_names:
            raise UserError(
                "method.csc: class-specific context is tied to the classes it was trained on; "
                "it cannot score other classes (use csc: false for base-to-novel or transfer)"
            )
        bb = self.backbone
        rows = [self.prompt_layout(bb.tokenize_words(n)) for n in classes.names]
        longest = max(len(ids) for ids, _ in rows)
        if longest > bb.context_length:
            raise UserError(f"method.n_ctx: prompts of {longest} tokens exceed the context length {bb.context_length}")
        device = self.ctx.device
        ids = torch.zeros(len(rows), longest, dtype=torch.long, device=device)
        slots = torch.full((len(rows), longest), -1, dtype=torch.long, device=device)
        for i, (row_ids, row_slots) in enumerate(rows):
            ids[i, : len(row_ids)] = torch.tensor(row_ids)
            slots[i, : len(row_slots)] = torch.tensor(row_slots)
        with torch.no_grad():
            base = bb.embed_tokens(ids).float()
        self.register_buffer("token_ids", ids, persistent=False)
        self.register_buffer("slots", slots, persistent=False)
        self.register_buffer("base", base, persistent=False)
        self._cached = None

    def text_features(self) -> torch.Tensor:
        """``[C, D]`` class text features from the current context."""
        prompts = assemble_prompts(self.base, self.ctx, self.slots, self.backbone.positional_embedding.float())
        return self.backbone.encode_text_embeddings(prompts, self.token_ids, add_positional=False)

    def train(self, mode: bool = True):
        self._cached = None
        return super().train(mode)

    def forward(self, images=None, image_features=None) -> MethodOutput:
        if image_features is None:
            image_features = self.backbone.encode_image(images)
        if self.training or self._cached is None:
            text = self.text_features()
            if not self.training:  # static prompts: text features once per evaluation
                self._cached = text.detach()
        else:
            text = self._cached
        return MethodOutput(cosine_logits(image_features.float(), text.float(), self.backbone.logit_scale))


@hookimpl
def vlprompt_methods() -> list[MethodPlugin]:
    return [MethodPlugin("coop", CoOpOptions, CoOp, "CoOp: learned context vectors in the text prompt")]
