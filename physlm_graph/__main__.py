"""``python -m physlm_graph`` runs the command line (also under torchrun)."""

import sys

from physlm_graph.cli import main

sys.exit(main())
