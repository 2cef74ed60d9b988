"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class SynthNetError(Exception):
    """A user-facing error: bad input, bad config, or a file that cannot be used."""
