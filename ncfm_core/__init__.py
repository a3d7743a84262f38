"""ncfm_core: the NCFM algorithm (characteristic-function matching) and the artifact store.

The public Python API (docs/python.md), importable from here: :func:`distill`,
:func:`open_synthetic`, :func:`evaluate`, :func:`dataset_from_tensors`, :class:`DistillResult`
and :class:`SyntheticDataset` (defined in :mod:`ncfm_core.api`). The names ``distill`` and ``evaluate`` here are
those functions; the modules of the same names are imported as ``from ncfm_core.distill import
...`` and ``from ncfm_core.evaluate import ...``.

This package never imports typer or rich; the command line lives in ``ncfm_cli``.
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("ncfm")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.1.0"

# After __version__: the modules below read it while they load.
from ncfm_core.api import (  # noqa: E402
    DistillResult,
    SyntheticDataset,
    dataset_from_tensors,
    distill,
    evaluate,
    open_synthetic,
)

__all__ = [
    "DistillResult",
    "SyntheticDataset",
    "__version__",
    "dataset_from_tensors",
    "distill",
    "evaluate",
    "open_synthetic",
]
