"""The per-user folders ncfm falls back to, from platformdirs, imported only when needed.

A machine with no platformdirs (some GPU images ship without it) still runs ncfm when the
store and the data folder are given (``--store``/``$NCFM_HOME``, ``--data-dir``/``$NCFM_DATA_DIR``).
"""

from __future__ import annotations

from ncfm_core.errors import ConfigError


def user_dir(kind: str) -> str:
    """``platformdirs.<kind>("ncfm")`` (``kind``: ``user_data_dir`` or ``user_cache_dir``);
    ``ConfigError`` naming the settings that avoid it when platformdirs is not installed."""
    try:
        import platformdirs
    except ImportError:
        raise ConfigError(
            "platformdirs is not installed, so ncfm has no default folders here: set NCFM_HOME (or --store) "
            "and NCFM_DATA_DIR (or --data-dir), or `pip install platformdirs`"
        ) from None
    return getattr(platformdirs, kind)("ncfm")
