"""The line plot of the results pages (digits_table.py, tools/docs_pictures.py): matplotlib,
through ``ncfm_core.plot`` (the optional extra ``ncfm[plot]``; a one-line error names it when
missing). Everything else the scripts share is in kit.py.

Not a package: the scripts import it as a sibling module (their directory is on ``sys.path``).
"""

from __future__ import annotations

from ncfm_core.plot import Series, line_plot

__all__ = ["Series", "line_plot"]
