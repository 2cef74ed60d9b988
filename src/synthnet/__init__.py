"""SynthNet: synthesize trained neural-network weights from random initialisations."""

__version__ = "0.1.0"
