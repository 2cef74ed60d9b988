"""``python -m synthnet`` (and ``torchrun -m synthnet``) is the ``synthnet`` command."""

import logging
import os
import sys

from synthnet.cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # a torchrun worker whose work is done and written: leave without the interpreter's finalisation, where
    # between 1 in 6 and 1 in 24 two-process evaluations aborted after its last Python line (torch 2.13, gloo: 'terminate
    # called without an active exception', SIGABRT), failing a run that had finished
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
