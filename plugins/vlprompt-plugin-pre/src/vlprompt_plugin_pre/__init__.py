"""PRE: "Prompt Learning with Reparameterization Encoder" (Pham et al., arXiv 2309.07760).

CoOp whose context vectors pass through a prompt encoder before they enter the
text tower, with a residual connection: ``ctx' = encoder(ctx) + ctx``. The
encoder is a bidirectional LSTM over the M context vectors (the published
setting), or a bottleneck MLP applied to each vector. The encoded context does
not depend on the image, so evaluation computes it, and the class text
features, once.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from vlprompt_core import hookimpl
from vlprompt_core.api import Batch, ClassSet, MethodEntry, MethodOutput, Options, PromptMethod
from vlprompt_core.errors import UserError
from vlprompt_core.prompting import PromptTable, PromptTemplate, init_context
from vlprompt_core.prompting.settle import settle_context
from vlprompt_core.recipes import Recipe
from vlprompt_kernels import cosine_logits


class PREOptions(Options):
    """``method: {name: pre, ...}`` (defaults: the published base-to-novel setting)."""

    n_ctx: int = Field(4, ge=1, description="number of context vectors M (ignored when ctx_init is set)")
    ctx_init: str = Field("a photo of a", description="initialise the context from these words ('' for random)")
    class_token_position: Literal["end", "middle", "front"] = Field("end", description="as in CoOp")
    csc: bool = Field(False, description="class-specific context (random initialisation only)")
    init_std: float = Field(0.02, gt=0, description="std of the random N(0, std^2) initialisation")
    encoder: Literal["lstm", "lstm2", "mlp", "mlp2"] = Field(
        "lstm",
        description="prompt encoder: 'lstm' (bidirectional, 1 layer; published), 'lstm2' (2 layers), "
        "'mlp' (width -> mlp_hidden -> width per vector), 'mlp2' (the same MLP applied twice)",
    )
    residual: bool = Field(True, description="ctx' = encoder(ctx) + ctx (published); false: ctx' = encoder(ctx)")
    mlp_hidden: int = Field(64, ge=1, description="bottleneck width of the MLP encoders")
    lstm_dropout: float = Field(0.05, ge=0, lt=1, description="dropout between the layers of 'lstm2'")

    @model_validator(mode="after")
    def _csc_needs_random_init(self):
        if self.csc and self.ctx_init:
            raise ValueError("csc applies to random initialisation only; set ctx_init: '' or drop csc")
        return self


def _odd_width(width: int) -> str:
    return f"method.encoder: a bidirectional LSTM needs an even text width, got {width} (use encoder: mlp)"


class PromptEncoder(nn.Module):
    """The reparameterisation encoder, applied to context ``[M, W]`` (one sequence)
    or ``[C, M, W]`` (class-specific context: C sequences)."""

    def __init__(self, kind: str, width: int, mlp_hidden: int, lstm_dropout: float):
        super().__init__()
        self.kind = kind
        if kind.startswith("lstm"):
            if width % 2:
                raise UserError(_odd_width(width))
            layers = 2 if kind == "lstm2" else 1
            self.lstm = nn.LSTM(width, width // 2, num_layers=layers, bidirectional=True, batch_first=True,
                                dropout=lstm_dropout if layers > 1 else 0.0)
        else:
            self.mlp = nn.Sequential(OrderedDict([
                ("linear1", nn.Linear(width, mlp_hidden)),
                ("relu", nn.ReLU()),
                ("linear2", nn.Linear(mlp_hidden, width)),
            ]))

    def forward(self, ctx: torch.Tensor) -> torch.Tensor:
        if self.kind.startswith("lstm"):
            return self.lstm(ctx)[0]  # [forward states | backward states] per vector
        out = self.mlp(ctx)
        return self.mlp(out) if self.kind == "mlp2" else out  # mlp2: the same weights twice


CSC_FIXED = "method.csc: class-specific context cannot score other classes (use csc: false)"


class PRE(PromptMethod):
    inputs = ("image_features",)

    @classmethod
    def effective_options(cls, options, backbone):
        """``n_ctx`` as ``ctx_init`` makes it; an LSTM encoder on an odd text width, or an
        ``n_ctx`` the words contradict, refused before the run."""
        if options.encoder.startswith("lstm") and backbone.text_width is not None and backbone.text_width % 2:
            raise UserError(_odd_width(backbone.text_width))
        return settle_context(options, backbone)

    def __init__(self, backbone, classes: ClassSet, options: PREOptions):
        super().__init__(backbone, classes, options)
        per_class = len(classes) if options.csc else None
        self.ctx = nn.Parameter(init_context(backbone, options.n_ctx, options.ctx_init, options.init_std, per_class))
        self.encoder = PromptEncoder(options.encoder, backbone.text_width, options.mlp_hidden,
                                     options.lstm_dropout).to(self.ctx.device)
        self.template = PromptTemplate.with_context(self.ctx.shape[-2], options.class_token_position)
        self._trained_names = list(classes.names)
        self.set_classes(classes)

    @classmethod
    def fixed_classes(cls, options: PREOptions) -> str | None:
        return CSC_FIXED if options.csc else None

    def set_classes(self, classes: ClassSet) -> None:
        if self.options.csc and list(classes.names) != self._trained_names:
            raise UserError(CSC_FIXED)
        self.prompts = PromptTable(self.backbone, classes.names, self.template)

    def encoded_context(self) -> torch.Tensor:
        """``encoder(ctx) + ctx`` (or ``encoder(ctx)`` without the residual)."""
        out = self.encoder(self.ctx)
        return out + self.ctx if self.options.residual else out

    def text_features(self) -> torch.Tensor:
        return self.prompts.encode(self.backbone, self.encoded_context())

    def forward(self, batch: Batch) -> MethodOutput:
        text = self.cached("text_features", self.text_features)  # static: once per evaluation
        return MethodOutput(cosine_logits(batch.image_features.float(), text.float(), self.backbone.logit_scale))


#: minhanh151/PRE ``configs/trainers/PRE/vit_b16_ep50_ctxv1.yaml`` and
#: ``scripts/base2new_train.sh``: LSTM encoder with residual, context from "a photo of a",
#: SGD lr 0.002 (weight decay 5e-4 on the encoder too), batch 32, 50 epochs, one constant
#: warm-up epoch at 1e-5, cosine.
RECIPE = Recipe(
    train={"optimizer": "sgd", "lr": 0.002, "batch_size": 32, "epochs": 50, "weight_decay": 5e-4,
           "momentum": 0.9, "warmup_epochs": 1, "warmup_lr": 1e-5},
    source="minhanh151/PRE configs/trainers/PRE/vit_b16_ep50_ctxv1.yaml, scripts/base2new_train.sh",
)


@hookimpl
def vlprompt_methods() -> list[MethodEntry]:
    return [MethodEntry("pre", PREOptions, PRE, "PRE: CoOp context through a residual prompt encoder (BiLSTM)", RECIPE)]
