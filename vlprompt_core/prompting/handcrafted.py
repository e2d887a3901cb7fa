"""Hand-written prompt templates and the frozen class features made with them.

* :data:`ENSEMBLE_TEMPLATES`, :data:`TemplateChoice`, :func:`templates_for` and
  :func:`check_templates` — which hand-written templates an option stands for.
* :func:`class_text_features` — frozen hand-crafted class features (one template
  or an ensemble), as zero-shot CLIP and methods' priors use them.
* :func:`prompt_length_problem` — the one rule for a prompt longer than the backbone's
  text context, which a text tower would cut (and with it the class name or the end of
  the prompt): refused, in one line naming the class, its length and the context.
  Hand-written prompts (:func:`handwritten_length_problem`, checked by
  :func:`class_text_features` and by ``vlprompt validate``) and learned ones
  (:class:`~vlprompt_core.prompting.PromptTable`) follow it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Union

import torch
import torch.nn.functional as F

from ..api import ClassSet, VisionLanguageBackbone
from ..errors import UserError

#: The 7 templates the reference ``ZeroshotCLIP2`` averages (with the dataset's own).
ENSEMBLE_TEMPLATES = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]

#: ``"dataset"`` (the dataset's first template), ``"ensemble"`` (the dataset's prompt
#: ensemble, see :func:`templates_for`), or a list of templates with ``{}``.
TemplateChoice = Union[Literal["dataset", "ensemble"], list[str]]


def templates_for(choice: TemplateChoice, classes: ClassSet) -> list[str]:
    """The hand-written templates ``choice`` stands for on ``classes``.

    ``"ensemble"`` is ``classes.ensemble`` when the dataset names one (its spec
    file's ``ensemble:``, e.g. the reference ``ZeroshotCLIP2``'s 7 templates alone for
    ImageNet, the 7 plus the dataset's own template elsewhere), else the dataset's
    templates followed by :data:`ENSEMBLE_TEMPLATES`.
    """
    if choice == "dataset":
        return classes.templates[:1]
    if choice == "ensemble":
        if classes.ensemble:
            return list(dict.fromkeys(classes.ensemble))
        return list(dict.fromkeys(classes.templates + ENSEMBLE_TEMPLATES))
    return list(choice)


def check_templates(value):
    """A validator for :data:`TemplateChoice` option fields: every template needs ``{}``."""
    if isinstance(value, list):
        bad = [t for t in value if "{}" not in t]
        if bad or not value:
            raise ValueError(f"each template needs a '{{}}' for the class name: {bad or 'empty list'}")
    return value


#: Classes named in a prompt-length problem before "... (N in all)".
SHOWN = 3


def prompt_length_problem(prompts: list[tuple[str, str, int]], context_length: int, fix: str) -> str | None:
    """One line when a prompt is longer than ``context_length`` tokens, else None.

    ``prompts``: (class name, the prompt as text, its length in tokens with the start
    and end tokens). The line names the class with the longest such prompt, that
    prompt, its length and the context, and how many classes have one."""
    over = [p for p in prompts if p[2] > context_length]
    if not over:
        return None
    name, text, length = max(over, key=lambda p: p[2])
    classes = list(dict.fromkeys(p[0] for p in over))
    more = ""
    if len(classes) > 1:
        shown = ", ".join(repr(c) for c in classes[:SHOWN])
        more = f" ({len(classes)} classes in all: {shown}{', ...' if len(classes) > SHOWN else ''})"
    return (f"class {name!r}: its prompt {text!r} is {length} tokens, over the backbone's text context of "
            f"{context_length}{more}; {fix} (a longer prompt would be cut)")


def handwritten_length_problem(names: list[str], templates: list[str], count: Callable[[str], int],
                               context_length: int) -> str | None:
    """:func:`prompt_length_problem` for every class in ``names`` with every template;
    ``count(text)``: the tokens of a text with the start and end tokens."""
    prompts = [(n, t.format(n), count(t.format(n))) for t in dict.fromkeys(templates) for n in names]
    return prompt_length_problem(prompts, context_length,
                                 "shorten the class name (classnames), or the template")


def _word_counter(backbone: VisionLanguageBackbone) -> Callable[[str], int] | None:
    """Tokens of a text with the start and end tokens, on ``backbone`` (None: its
    tokenizer cannot tell)."""
    try:
        backbone.tokenize_words("a")
    except UserError:
        return None
    return lambda text: len(backbone.tokenize_words(text)) + 2


@torch.no_grad()
def class_text_features(backbone: VisionLanguageBackbone, names: list[str], templates: list[str]) -> torch.Tensor:
    """Frozen class features: the mean over templates of normalised text features,
    re-normalised: ``[C, embed_dim]`` (fp32). A prompt longer than the backbone's text
    context is a :class:`UserError` naming the class (:func:`prompt_length_problem`)."""
    count = _word_counter(backbone)
    if count is not None:
        problem = handwritten_length_problem(names, templates, count, backbone.context_length)
        if problem:
            raise UserError(problem)
    device = backbone.positional_embedding.device
    feats = []
    for template in templates:
        tokens = backbone.tokenize([template.format(n) for n in names]).to(device)
        feats.append(F.normalize(backbone.encode_text(tokens).float(), dim=-1))
    return F.normalize(torch.stack(feats).mean(0), dim=-1)
