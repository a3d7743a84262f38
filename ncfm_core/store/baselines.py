"""The full-data baseline cache: ``<store root>/baselines/<key>.json``, one evaluation of a
network trained on a whole training set, reused by every artifact of that dataset and protocol.
This module owns the file: what is written beside the result, and what a cached entry must
satisfy to be trusted."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from ncfm_core.store.files import read_json, write_json
from ncfm_core.store.layout import BASELINES_DIR

BASELINE_FORMAT = "ncfm-baseline/1"
# Kept in the cache file for provenance and validation; the reported baseline leaves them out
# (its protocol is the synthetic set's, shown once).
CACHE_ONLY_FIELDS = ("format", "key", "dataset_fingerprint", "versions", "protocol")


def baseline_path(root: Path, key: str) -> Path:
    """Where the baseline ``key`` is cached under the store ``root``."""
    return Path(root) / BASELINES_DIR / f"{key}.json"


def _is_fraction(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1


def validated_baseline(cached: dict, key: str, protocol: dict[str, Any]) -> dict[str, Any]:
    """``cached`` if it is the full baseline ``key`` for ``protocol``, else ``ValueError(reason)``."""
    if cached.get("format") != BASELINE_FORMAT:
        raise ValueError(f"format {cached.get('format')!r}, expected {BASELINE_FORMAT!r}")
    if cached.get("key") != key:
        raise ValueError(f"it holds baseline {cached.get('key')!r}")
    # Execution-only fields (how the repeats were scheduled) do not change the result.
    comparable = {k: v for k, v in json.loads(json.dumps(protocol)).items() if k != "repeat_mode"}
    stored = cached.get("protocol")
    if not isinstance(stored, dict) or {k: v for k, v in stored.items() if k != "repeat_mode"} != comparable:
        raise ValueError("its protocol differs from the requested one")
    accuracy_block = cached.get("accuracy")
    runs = accuracy_block.get("runs") if isinstance(accuracy_block, dict) else None
    if not isinstance(runs, list) or len(runs) != protocol["repeats"] or not all(_is_fraction(r) for r in runs):
        raise ValueError(f"accuracy.runs is not a list of {protocol['repeats']} fractions in [0, 1]")
    mean, std = accuracy_block.get("mean"), accuracy_block.get("std")
    expected_std = statistics.pstdev(runs) if len(runs) > 1 else 0.0
    if not (_is_fraction(mean) and _is_fraction(std) and abs(mean - statistics.fmean(runs)) <= 1e-9
            and abs(std - expected_std) <= 1e-9):
        raise ValueError("accuracy.mean / accuracy.std do not match accuracy.runs")
    return cached


def read_baseline(path: Path, key: str, protocol: dict[str, Any]) -> dict[str, Any]:
    """The cached baseline at ``path`` as it is reported (cache-only fields left out).
    ``ValueError``/``OSError``/``CorruptArtifactError`` when it is not the baseline ``key`` of
    ``protocol`` or not readable."""
    cached = validated_baseline(read_json(path), key, protocol)
    return {k: v for k, v in cached.items() if k not in CACHE_ONLY_FIELDS}


def write_baseline(path: Path, record: dict[str, Any], *, key: str, dataset_fingerprint: str,
                   versions: dict[str, str]) -> None:
    """Cache ``record`` (which holds ``protocol``) atomically, with what validates it later."""
    write_json(path, {**record, "format": BASELINE_FORMAT, "key": key, "dataset_fingerprint": dataset_fingerprint,
                      "versions": versions})
