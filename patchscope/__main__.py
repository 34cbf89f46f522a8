"""``python -m patchscope`` (and ``torchrun -m patchscope``) run the command line."""

import sys

from patchscope.cli.main import main

sys.exit(main())
