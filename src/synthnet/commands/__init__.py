"""One module per CLI command; importing this package registers them all with :mod:`synthnet.cli`."""

from synthnet.commands import zoo  # noqa: F401
from synthnet.commands import train  # noqa: F401
from synthnet.commands import generate  # noqa: F401
from synthnet.commands import pipeline  # noqa: F401
from synthnet.commands import evaluate  # noqa: F401
