"""`python -m vhostlab` is the `vhostlab` command."""
import sys

from vhostlab.cli import main

sys.exit(main())
