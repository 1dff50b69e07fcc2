"""`python -m vqgen ...` and `accelerate launch -m vqgen sample ...`."""

import sys

from vqgen.cli import main

sys.exit(main())
