"""``python -m synthnet`` (and ``torchrun -m synthnet``) is the ``synthnet`` command."""

import sys

from synthnet.cli import main

sys.exit(main())
