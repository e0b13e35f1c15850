"""``python -m offload_map``: the ``offload-map`` command line."""

import sys

from .cli import main

sys.exit(main())
