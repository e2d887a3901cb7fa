"""Shared text-prompt machinery for method plug-ins.

* :class:`PromptTemplate` — a prompt as pieces: learned context slots
  (:class:`Context`), the class name (``"{}"``) and fixed words.
* :class:`PromptTable` — a template laid out for a class list: token ids, the
  slot map that says where each context vector goes, and the frozen token
  embeddings; :meth:`PromptTable.encode` writes context vectors in (any leading
  shape: shared, per class, per image, per Monte-Carlo sample...) and runs the
  text tower, once over the tokens all classes share, and in chunks that bound
  its memory (:func:`text_chunking`).
* :func:`init_context` — context vectors from words or random; :func:`leading_words` —
  learn the first n tokens of a phrase and keep the rest as words (MaPLe, IVLP).
* deep prompts (:mod:`~vlprompt_core.prompting.deep`): prompts for the towers' later
  blocks — :func:`text_prompt_hook`, :func:`vision_prompt_hook`, :func:`append_prompts`,
  :func:`replace_slots`, :func:`deep_prompts`, :func:`prompt_depth`.
* :func:`class_text_features` — frozen hand-crafted class features (one template
  or an ensemble), as zero-shot CLIP and methods' priors use them.
* fitted class names (:mod:`~vlprompt_core.prompting.fitted_names`): :func:`names_tensor` and
  :func:`names_of` keep the names a method was fitted on in a checkpoint; :func:`rows_by_name`
  finds the fitted rows of the classes asked for, refusing others in the caller's words.
* :func:`prompt_length_problem` — the one rule for a prompt longer than the text
  context (refused, naming the class), which every prompt above follows.

Image-independent features are cached per evaluation with
:meth:`vlprompt_core.api.PromptMethod.cached`.

The machinery lives in seven modules, all of it importable from here:

* :mod:`~vlprompt_core.prompting.handcrafted` — hand-written templates
  (:func:`templates_for`, :func:`check_templates`, :data:`TemplateChoice`) and
  :func:`class_text_features`.
* :mod:`~vlprompt_core.prompting.chunking` — the run-wide text-pass chunking setting
  (:func:`text_chunking`, :func:`current_text_chunking`, :func:`rows_per_pass`).
* :mod:`~vlprompt_core.prompting.learned` — learned prompts (:class:`Context`,
  :class:`PromptTemplate`, :func:`init_context`, :func:`leading_words`);
  :mod:`~vlprompt_core.prompting.table` — a template laid out for a class list and its
  text pass (:class:`PromptTable`).
* :mod:`~vlprompt_core.prompting.deep` — deep prompts, shared by MaPLe-like methods.
* :mod:`~vlprompt_core.prompting.sharding` — the text pass sharded over classes across the
  processes of a distributed run (:func:`shard_classes`, :func:`sharded_over_classes`).
* :mod:`~vlprompt_core.prompting.fitted_names` — the class names a method was fitted on
  (:func:`names_tensor`, :func:`names_of`, :func:`rows_by_name`).

Settings are read where they are defined: patch ``AUTO_CHUNK_BUDGET`` on
:mod:`~vlprompt_core.prompting.chunking`, not on this package.
"""

from __future__ import annotations

from .chunking import (
    ACTIVATION_VECTORS_PER_TOKEN,
    AUTO_CHUNK_BUDGET,
    TextChunking,
    current_text_chunking,
    rows_per_pass,
    text_chunking,
)
from .handcrafted import (
    ENSEMBLE_TEMPLATES,
    TemplateChoice,
    check_templates,
    class_text_features,
    handwritten_length_problem,
    prompt_length_problem,
    templates_for,
)
from .sharding import current_class_sharding, shard_classes, sharded_over_classes
from .fitted_names import names_of, names_tensor, rows_by_name
from .deep import append_prompts, deep_prompts, prompt_depth, replace_slots, text_prompt_hook, vision_prompt_hook
from .learned import CLASS_NAME, Context, PromptTemplate, init_context, leading_words, leading_words_problem
from .table import PromptTable

__all__ = [
    "ACTIVATION_VECTORS_PER_TOKEN",
    "AUTO_CHUNK_BUDGET",
    "CLASS_NAME",
    "ENSEMBLE_TEMPLATES",
    "Context",
    "PromptTable",
    "PromptTemplate",
    "TemplateChoice",
    "TextChunking",
    "check_templates",
    "class_text_features",
    "current_class_sharding",
    "current_text_chunking",
    "handwritten_length_problem",
    "init_context",
    "leading_words",
    "leading_words_problem",
    "names_of",
    "names_tensor",
    "append_prompts",
    "deep_prompts",
    "prompt_depth",
    "replace_slots",
    "rows_by_name",
    "text_prompt_hook",
    "vision_prompt_hook",
    "prompt_length_problem",
    "rows_per_pass",
    "shard_classes",
    "sharded_over_classes",
    "templates_for",
    "text_chunking",
]
