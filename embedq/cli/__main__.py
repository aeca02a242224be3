"""``python -m embedq.cli``: the same command as the ``embedq`` script."""

from embedq.cli import main

main()
