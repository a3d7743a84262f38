"""ncfm_core: the NCFM algorithm (characteristic-function matching) and the artifact store.

This package never imports typer or rich; the command line lives in ``ncfm_cli``.
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("ncfm")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.1.0"

__all__ = ["__version__"]
