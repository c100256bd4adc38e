"""tapework: a DVC-orchestrated TensorFlow pipeline around a hand-written training loop."""

__version__ = "0.1.0"
