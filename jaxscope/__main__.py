"""``python -m jaxscope`` runs the command line (same as the ``jaxscope`` script)."""

import sys

from jaxscope.cli import main

sys.exit(main())
