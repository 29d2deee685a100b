"""`python -m exo_bridge.runner PLAN ...`: the same as `exo-bridge run PLAN ...`."""

import sys

from exo_bridge.runner.run import main

sys.exit(main())
