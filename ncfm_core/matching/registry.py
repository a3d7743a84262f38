"""The registry of matching losses: a plain dict filled by ``@register_matching(name)``.

This module imports neither torch nor the losses, so anything may ask which names exist
(``ncfm_core.config`` validates ``DistillConfig.matching`` against it); importing the package
``ncfm_core.matching`` registers the built-in losses (``ncfm``, ``mmd``).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, TypeVar

from ncfm_core.errors import ConfigError

__all__ = ["RESERVED_NAME", "matching_class", "matching_descriptions", "matching_names", "register_matching",
           "unknown_matching_message"]

RESERVED_NAME = "list"  # asks for the listing of the registry, so no loss may take it

_REGISTRY: dict[str, Any] = {}  # name -> the MatchingLoss subclass (ncfm_core.matching.base)

LossClass = TypeVar("LossClass", bound=type)


def register_matching(name: str) -> Callable[[LossClass], LossClass]:
    """Class decorator that files a :class:`~ncfm_core.matching.base.MatchingLoss` subclass under
    ``name`` (lower case) and sets its ``name``. The class must carry a one-line ``description``
    (what ``--matching list`` shows) and define every abstract method (a loss without its memory
    terms would leave the plan silently wrong)."""
    key = name.strip().lower()

    def add(cls: LossClass) -> LossClass:
        if not key.isidentifier() or key == RESERVED_NAME:
            raise ValueError(f"matching loss name {name!r} must be an identifier other than {RESERVED_NAME!r}")
        if key in _REGISTRY:
            raise ValueError(f"matching loss {key!r} is registered twice")
        description = getattr(cls, "description", "")
        if not isinstance(description, str) or not description.strip() or "\n" in description:
            raise ValueError(f"matching loss {key!r} needs a one-line description")
        missing = sorted(getattr(cls, "__abstractmethods__", ()))
        if missing:
            raise TypeError(f"matching loss {key!r} does not define {', '.join(missing)}")
        cls.name = key
        _REGISTRY[key] = cls
        return cls

    return add


def matching_names() -> list[str]:
    """Sorted names of every registered matching loss."""
    return sorted(_REGISTRY)


def matching_descriptions() -> list[tuple[str, str]]:
    """(name, one-line description) of every registered loss, sorted by name."""
    return [(name, _REGISTRY[name].description) for name in matching_names()]


def unknown_matching_message(name: str) -> str:
    """The one-line error for a name that is not registered: the closest name, and every name."""
    close = difflib.get_close_matches(str(name).strip().lower(), matching_names(), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"matching (--matching): unknown matching loss {name!r}; {hint}choose one of: {', '.join(matching_names())}"


def matching_class(name: str) -> Any:
    """The class registered under ``name`` exactly (configs hold the canonical lower-case name);
    :class:`ConfigError` naming the valid choices otherwise."""
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ConfigError(unknown_matching_message(name))
    return cls
