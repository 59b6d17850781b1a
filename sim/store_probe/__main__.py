"""``python -m sim.store_probe OUT PROBE_DIR``."""

import sys

from sim.store_probe import main

sys.exit(main())
