"""Textbook mode: compute what the reference code computes, the way it computes it.

The engine and the prompt machinery take shortcuts that change the cost, never
the function: text sequences cut after the last pooled token, a shared prompt
prefix run once, image-independent text features computed once per evaluation,
frozen test-image features extracted once per run, all images of a batch in one
text pass. Textbook mode turns every shortcut off, for benchmarks
(``benchmarks/engine.py``) and for tests that the shortcuts change nothing:

* the text tower runs the full ``context_length`` (77) tokens of every prompt
  (:class:`~vlprompt_core.prompting.PromptTable`, the open_clip backbone);
* no shared-prefix pass and no chunking of the text pass;
* :meth:`~vlprompt_core.api.PromptMethod.cached` computes every time (text
  features again for every test batch);
* the engine encodes the test images of every batch for every method, and calls
  methods whose text depends on the image (:attr:`~vlprompt_core.api.PromptMethod.per_image_text`,
  e.g. CoCoOp) one image at a time, as the reference code loops over a batch.

>>> with textbook():
...     Engine(spec, registry).run()
"""

from __future__ import annotations

import contextlib
import contextvars

_ACTIVE = contextvars.ContextVar("vlprompt_textbook", default=False)


def active() -> bool:
    """Whether textbook mode is on in this context."""
    return _ACTIVE.get()


@contextlib.contextmanager
def textbook(on: bool = True):
    """Textbook mode (``on``) or the engine's own computation inside the block."""
    token = _ACTIVE.set(on)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
