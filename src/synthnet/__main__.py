"""``python -m synthnet`` (and ``torchrun -m synthnet``) is the ``synthnet`` command."""

import logging
import os
import sys

from synthnet.cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # a torchrun worker whose work is done and written leaves without the interpreter's finalisation: there,
    # after the last Python line, between 1 in 6 and 1 in 24 two-process evaluations aborted (torch 2.13, gloo:
    # 'terminate called without an active exception', SIGABRT), failing runs that had finished
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
