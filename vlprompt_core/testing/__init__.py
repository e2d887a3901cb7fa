"""Testing helpers for vlprompt and its plug-ins (import in tests only; needs pytest).

* :class:`MethodContract` — the test battery every method plug-in runs (see
  :mod:`vlprompt_core.testing.contract`); :class:`LoggerContract` — every logger
  plug-in's (:mod:`vlprompt_core.testing.logger_contract`).
* :func:`make_world`, :func:`tiny_backbone`, :func:`write_tiny_config`,
  :func:`write_split_dataset` — a tiny random open_clip model and generated
  datasets in the benchmarks' layout, for tests that need no downloads;
  :func:`edited_backbone` — a copy with its attention projections' weights edited, the
  reference for an adapter of the projections;
  :func:`random_images` and :func:`frozen_features` — seeded inputs for it.
* :func:`synthetic_frozen_data` — a :class:`~vlprompt_core.api.FrozenData` of random
  images, to test a method's ``before_training`` / ``after_training`` without a run.
"""

from .contract import Case, MethodContract
from .frozen import SyntheticFrozenData, synthetic_frozen_data
from .logger_contract import LoggerContract
from .worlds import (
    TINY_CONFIG,
    edited_backbone,
    frozen_features,
    make_world,
    random_images,
    tiny_backbone,
    write_split_dataset,
    write_tiny_config,
)

__all__ = ["Case", "LoggerContract", "MethodContract", "TINY_CONFIG", "edited_backbone", "frozen_features",
           "make_world", "random_images",
           "tiny_backbone", "write_split_dataset", "write_tiny_config", "SyntheticFrozenData", "synthetic_frozen_data"]
