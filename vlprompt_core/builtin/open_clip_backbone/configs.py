"""open_clip's model configs and tokenizers, each made once per content in a process.

``open_clip.add_model_config(path)`` appends ``path`` to open_clip's list and reads
every config in that list again (its own hundred or so files, and every file added
before), so a process that builds many models (a sweep in one process, a test worker)
would spend longer on each. :func:`register_model_config` reads only the file it is
given, and tells open_clip only when open_clip holds other content under that name.

``open_clip.get_tokenizer`` reads the BPE vocabulary again for every call;
:func:`tokenizer` keeps one tokenizer per model config (a tokenizer holds no state a
backbone changes, only a cache of words it has split).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any


def register_model_config(path: Path) -> str:
    """Make the model config file ``path`` known to open_clip under its stem (as
    ``open_clip.add_model_config`` does, the file added last winning a name); the name."""
    import open_clip
    from open_clip import factory

    path = Path(path)
    config = json.loads(path.read_text())
    if open_clip.get_model_config(path.stem) != config:
        configs = getattr(factory, "_MODEL_CONFIGS", None)
        if isinstance(configs, dict) and all(k in config for k in ("embed_dim", "vision_cfg", "text_cfg")):
            configs[path.stem] = config  # what add_model_config's rescan sets for this file
        else:  # another open_clip: its own way
            open_clip.add_model_config(path)
    return path.stem


def tokenizer(name: str) -> Any:
    """``open_clip.get_tokenizer(name)``, made once for each config registered under ``name``."""
    import open_clip

    return _tokenizer(name, json.dumps(open_clip.get_model_config(name), sort_keys=True))


@functools.lru_cache(maxsize=16)
def _tokenizer(name: str, config: str) -> Any:  # keyed by the config too: another file may take the name
    import open_clip

    return open_clip.get_tokenizer(name)
