"""The installed ncfm version, in a module of its own so that any layer can read it without
importing the package root (which imports the Python API, and through it every job)."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("ncfm")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.1.0"
