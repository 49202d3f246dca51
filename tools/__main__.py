"""`python -m viewpipe.tools` is the `viewpipe` command."""

import sys

from .cli import main

sys.exit(main())
