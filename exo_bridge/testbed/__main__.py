"""`python -m exo_bridge.testbed up|down|status` (see exo_bridge.testbed.cli)."""

import sys

from exo_bridge.testbed.cli import main

sys.exit(main())
