"""vlprompt: prompt learning for CLIP-like vision-language models, as plug-ins.

The public Python API. Use what a run trained::

    import vlprompt

    clf = vlprompt.load("runs/quickstart", method="coop", seed=1)   # or a file 'vlprompt export' wrote
    clf.predict(["photo.png"]).names

The rest of the framework (plug-in contract, engine, spec) is ``vlprompt_core``.
"""

from vlprompt_core import __version__
from vlprompt_core.errors import UserError
from vlprompt_core.inference import Classifier, Predictions, export, load

__all__ = ["__version__", "load", "export", "Classifier", "Predictions", "UserError"]
