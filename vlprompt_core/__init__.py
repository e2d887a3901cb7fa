"""vlprompt: prompt learning for CLIP-like vision-language models, as plug-ins."""

import pluggy

__version__ = "0.1.0"

#: Marker for hook implementations; plug-ins use ``@vlprompt_core.hookimpl``.
hookimpl = pluggy.HookimplMarker("vlprompt")

__all__ = ["__version__", "hookimpl"]
