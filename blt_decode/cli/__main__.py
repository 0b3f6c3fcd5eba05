"""``python -m blt_decode.cli ...``: the command line."""

import sys

from blt_decode.cli.main import main

sys.exit(main())
