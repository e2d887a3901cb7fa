"""``python -m vlprompt``: the ``vlprompt`` command (e.g. ``torchrun --nproc-per-node 4 -m vlprompt run spec.yaml``)."""

from vlprompt_core.cli import main

if __name__ == "__main__":
    main()
