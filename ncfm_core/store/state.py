"""The nested-state codec: arbitrary nested states (optimiser state dicts, RNG states) as
a flat tensor dict plus a JSON tree (``flatten_state``), so one checkpoint is one
safetensors file (``save_state``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ncfm_core.errors import CorruptArtifactError, one_line
from ncfm_core.store.tensors import load_tensors, save_tensors

STATE_TREE_KEY = "ncfm_state_tree"
"""safetensors metadata key under which ``save_state`` stores the JSON tree."""

STATE_TREE_FORMAT = 1

# Tree encoding (JSON): None/bool/int/str and finite floats stand for themselves; a list is
# a list. Every JSON object whose keys start with "__" is a tag:
#   {"__tensor__": key}      a tensor stored under ``key`` in the flat tensor dict
#   {"__tuple__": [...]}     a tuple
#   {"__float__": "nan"}     a non-finite float ("nan", "inf", "-inf")
#   {"__dict__": [[k, v]]}   a dict whose keys are not all plain strings (e.g. the int
#                            parameter ids of an optimizer state_dict); keys are encoded
#                            like values, so 0 and "0" stay different
#   {"__dtype__": "float32"} a torch.dtype;  {"__device__": "cuda:0"} a torch.device
# Any other object is a dict with string keys none of which starts with "__".


def _encode(obj: Any, path: list[str], tensors: dict[str, Tensor], allow_tensors: bool = True) -> Any:
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if math.isfinite(obj):
            return float(obj)
        return {"__float__": "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")}
    if isinstance(obj, Tensor):
        if not allow_tensors:
            raise TypeError(f"{'.'.join(path) or '<root>'}: tensors cannot be dict keys")
        key = ".".join(path) or "__root__"
        unique_key, suffix = key, 1
        while unique_key in tensors:  # "a.b" and ["a"]["b"] would otherwise collide
            unique_key, suffix = f"{key}~{suffix}", suffix + 1
        tensors[unique_key] = obj
        return {"__tensor__": unique_key}
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if isinstance(obj, torch.device):
        return {"__device__": str(obj)}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(item, [*path, str(i)], tensors, allow_tensors) for i, item in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(item, [*path, str(i)], tensors, allow_tensors) for i, item in enumerate(obj)]
    if isinstance(obj, dict):
        if all(type(key) is str and not key.startswith("__") for key in obj):
            return {key: _encode(value, [*path, key], tensors, allow_tensors) for key, value in obj.items()}
        return {
            "__dict__": [
                [_encode(key, [*path, str(key)], tensors, allow_tensors=False), _encode(value, [*path, str(key)], tensors)]
                for key, value in obj.items()
            ]
        }
    raise TypeError(
        f"{'.'.join(path) or '<root>'}: cannot store a {type(obj).__name__} in a state; "
        "use tensors, dicts, lists, tuples, numbers, strings, bools or None"
    )


def _decode(node: Any, tensors: dict[str, Tensor], used: set[str]) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [_decode(item, tensors, used) for item in node]
    if not isinstance(node, dict):
        raise ValueError(f"unexpected {type(node).__name__} in state tree")
    tags = [key for key in node if key.startswith("__")]
    if not tags:
        return {key: _decode(value, tensors, used) for key, value in node.items()}
    if len(node) != 1:
        raise ValueError(f"malformed tag object with keys {sorted(node)}")
    tag, payload = tags[0], node[tags[0]]
    if tag == "__tensor__":
        if not isinstance(payload, str) or payload not in tensors:
            raise ValueError(f"state tree refers to missing tensor {payload!r}")
        used.add(payload)
        return tensors[payload]
    if tag == "__tuple__" and isinstance(payload, list):
        return tuple(_decode(item, tensors, used) for item in payload)
    if tag == "__float__" and payload in ("nan", "inf", "-inf"):
        return float(payload)
    if tag == "__dtype__" and isinstance(payload, str):
        dtype = getattr(torch, payload, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {payload!r} in state tree")
        return dtype
    if tag == "__device__" and isinstance(payload, str):
        return torch.device(payload)
    if tag == "__dict__" and isinstance(payload, list):
        result = {}
        for item in payload:
            if not (isinstance(item, list) and len(item) == 2):
                raise ValueError("malformed __dict__ entry in state tree")
            key = _decode(item[0], tensors, used)
            if isinstance(key, (list, dict, Tensor)):
                raise ValueError("unhashable dict key in state tree")
            result[key] = _decode(item[1], tensors, used)
        return result
    raise ValueError(f"unknown or malformed tag {tag!r} in state tree")


def flatten_state(obj: Any) -> tuple[dict[str, Tensor], dict]:
    """Split a nested state into ``(tensors, tree)``.

    ``obj`` may nest dicts (any keys of type str/int/float/bool/None/tuple), lists, tuples,
    ints, floats, strs, bools, None, torch dtypes/devices and tensors. ``tensors`` maps a
    dotted path such as ``"optimizer.state.0.exp_avg"`` to each tensor (the objects
    themselves, not copies); ``tree`` is JSON-able and holds ``{"__tensor__": key}`` where
    the tensors were. ``unflatten_state`` is the exact inverse, except that tensor subclasses
    (``nn.Parameter``) come back as plain tensors and tuple subclasses as tuples.
    """
    tensors: dict[str, Tensor] = {}
    root = _encode(obj, [], tensors)
    return tensors, {"format": STATE_TREE_FORMAT, "root": root}


def unflatten_state(tensors: dict[str, Tensor], tree: dict) -> object:
    """Rebuild the object ``flatten_state`` split into ``tensors`` and ``tree``.
    Raises ``ValueError`` if the tree is malformed, refers to a tensor that is missing, or
    leaves a tensor unused."""
    if not isinstance(tree, dict) or tree.get("format") != STATE_TREE_FORMAT or "root" not in tree:
        raise ValueError(f"not a state tree of format {STATE_TREE_FORMAT}")
    used: set[str] = set()
    obj = _decode(tree["root"], tensors, used)
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"tensors not referenced by the state tree: {unused[:5]}")
    return obj


def save_state(path: Path, state: Any) -> str:
    """Atomically write a nested ``state`` (see ``flatten_state``) as ONE safetensors file,
    the tree JSON in its metadata under ``"ncfm_state_tree"``: a checkpoint is replaced in
    one rename, so resume never sees half of an old and half of a new one. Returns the file's sha256."""
    tensors, tree = flatten_state(state)
    return save_tensors(Path(path), tensors, {STATE_TREE_KEY: json.dumps(tree, sort_keys=True, allow_nan=False)})


def load_state(path: Path, device: str = "cpu") -> object:
    """Inverse of ``save_state``; tensors land on ``device`` (keep RNG states on CPU).
    ``NotFoundError`` if missing, one-line ``CorruptArtifactError`` for anything wrong."""
    path = Path(path)
    tensors, metadata = load_tensors(path, device=device)
    if STATE_TREE_KEY not in metadata:
        raise CorruptArtifactError(f"{path}: not an ncfm state file (no {STATE_TREE_KEY} metadata); restore or delete it")
    try:
        return unflatten_state(tensors, json.loads(metadata[STATE_TREE_KEY]))
    except (ValueError, TypeError, RecursionError) as err:
        raise CorruptArtifactError(f"{path}: broken state tree ({one_line(err)}); restore or delete this file") from None
