"""The embedded default: a procedural image-caption world and a tiny CLIP.

* :mod:`.world`    -- the generator (objects with colour, shape, size,
  texture, background, position and lighting; captions from templates).
* :mod:`.tasks`    -- downstream classification tasks written in the
  split-file layout (``write_task``, ``classnames``, ``TASKS``).
* :mod:`.pretrain` -- trains ``vlprompt_tiny`` (an open_clip ``CLIP``) on the
  world; its output ships beside this file as ``vlprompt_tiny.safetensors``.

Load the shipped model with::

    import open_clip
    from vlprompt_core.embedded.pretrain import register_config, weights_path
    register_config()
    model = open_clip.create_model("vlprompt_tiny", pretrained=str(weights_path()))

Importing this package imports nothing heavy; the sub-modules import numpy,
and torch/open_clip are imported inside the functions that need them.
"""
