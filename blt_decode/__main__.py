"""``python -m blt_decode ...`` (and ``torchrun ... -m blt_decode train ...``): the command line."""

import sys

from blt_decode.cli.main import main

sys.exit(main())
