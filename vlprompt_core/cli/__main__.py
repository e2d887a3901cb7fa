"""``python -m vlprompt_core.cli``: the ``vlprompt`` command."""

from . import main

if __name__ == "__main__":
    main()
