"""``python -m bowretrieval`` is the ``bowr`` command line."""
import sys

from .cli import main

sys.exit(main())
