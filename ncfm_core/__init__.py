"""ncfm_core: the NCFM algorithm (characteristic-function matching) and the artifact store.

The public Python API (docs/python.md), importable from here: :func:`distill`,
:func:`open_synthetic`, :func:`evaluate`, :func:`dataset_from_tensors`, :class:`DistillResult`
and :class:`SyntheticDataset` (defined in :mod:`ncfm_core.api`). The names ``distill`` and ``evaluate`` here are
those functions; the modules of the same names are imported as ``from ncfm_core.distill import
...`` and ``from ncfm_core.evaluate import ...``.

This package never imports typer or rich; the command line lives in ``ncfm_cli``.
"""

from ncfm_core.api import (
    DistillResult,
    SyntheticDataset,
    dataset_from_tensors,
    distill,
    evaluate,
    open_synthetic,
)
from ncfm_core.version import __version__

__all__ = [
    "DistillResult",
    "SyntheticDataset",
    "__version__",
    "dataset_from_tensors",
    "distill",
    "evaluate",
    "open_synthetic",
]
