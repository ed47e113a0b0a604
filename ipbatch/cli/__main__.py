"""`python -m ipbatch.cli`: the `ipbatch` command."""

import sys

from ipbatch.cli import main

sys.exit(main())
