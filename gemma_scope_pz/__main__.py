"""``python -m gemma_scope_pz``: the ``gemma-scope-pz`` command line."""

import sys

from gemma_scope_pz.app.cli import main

sys.exit(main())
