"""`python -m profiler MODEL ...` is `profile-model MODEL ...`."""

import sys

from profiler.cli import main

sys.exit(main())
