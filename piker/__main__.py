"""``python -m piker`` == the ``piker`` console script (tractor skips
re-running a package ``__main__`` in child actors)."""
from .cli import main

main()
