"""``python -m compression``: the same as the ``compression`` command."""

from compression.cli import main

main()
