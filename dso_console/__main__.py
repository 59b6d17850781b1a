"""``python -m dso_console``: the same as ``dso-console``."""

import sys

from dso_console.app import main

sys.exit(main())
