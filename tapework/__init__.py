"""tapework: a DVC-orchestrated TensorFlow pipeline around a hand-written training loop."""

from importlib import metadata

try:
    __version__ = metadata.version("tapework")  # pyproject.toml is the one place the version is written
except metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
