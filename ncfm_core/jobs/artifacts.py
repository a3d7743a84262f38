"""``ncfm export``, ``ncfm inspect``, ``ncfm ls``: reading what the store holds."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ncfm_core.export import export_synset
from ncfm_core.jobs.common import (
    complete_synset,
)
from ncfm_core.store import ArtifactVersion, Store


def export_job(
    store: Store,
    ref: str,
    fmt: str,
    out_dir: Path | str,
    *,
    decoded: bool = False,
) -> dict[str, Any]:
    """Write the synthetic set of ``ref`` under ``out_dir`` in format ``fmt`` (see
    ``ncfm_core.export``). Returns ``{artifact, path, format, decoded, out, files}``."""
    version = store.resolve(ref)
    synset = complete_synset(version, version.manifest())
    files = export_synset(synset.images, synset.labels, synset.class_names, Path(out_dir), fmt,
                          factor=synset.factor, decoded=decoded)
    return {
        "artifact": version.ref,
        "path": str(version.path),
        "format": fmt,
        "decoded": decoded,
        "out": str(Path(out_dir).absolute()),
        "files": [str(f) for f in files],
    }


def _file_sizes(directory: Path) -> dict[str, int]:
    sizes = {}
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts) and not path.name.endswith(".tmp"):
            sizes[relative.as_posix()] = path.stat().st_size
    return sizes


def inspect_job(store: Store, ref: str) -> dict[str, Any]:
    """The manifest of ``ref`` plus ``artifact`` (name@vN), ``path`` and ``file_sizes``
    (path relative to the version directory -> bytes)."""
    version = store.resolve(ref)
    result = dict(version.manifest())
    result.update(artifact=version.ref, path=str(version.path), file_sizes=_file_sizes(version.path))
    return result


def _last_accuracy(manifest: dict) -> float | None:
    evals = manifest.get("evals")
    if not isinstance(evals, list) or not evals or not isinstance(evals[-1], dict):
        return None
    mean = (evals[-1].get("accuracy") or {}).get("mean")
    return float(mean) if isinstance(mean, (int, float)) and math.isfinite(mean) else None


def list_job(store: Store) -> dict[str, Any]:
    """Every version in the store: ``{"artifacts": [row, ...], "warnings": [str, ...]}``; a row is
    ``{artifact, name, version, status, dataset, ipc, iterations_done, iterations_target,
    accuracy (last eval's mean or None), evals, created, path}``. Unreadable versions become
    warnings instead of errors."""
    found, warnings = store.scan()
    rows = []
    for version, manifest in found:
        config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
        if not config:
            warnings.append(f"{version.ref}: {version.manifest_path} has no config; not an ncfm distillation?")
        evals = manifest.get("evals")
        rows.append({
            "artifact": version.ref,
            "name": version.name,
            "version": version.version,
            "status": str(manifest.get("status", "unknown")),
            "dataset": config.get("dataset"),
            "ipc": config.get("ipc"),
            "iterations_done": manifest.get("iterations_done"),
            "iterations_target": manifest.get("iterations_target"),
            "accuracy": _last_accuracy(manifest),
            "evals": len(evals) if isinstance(evals, list) else 0,
            "created": manifest.get("created"),
            "path": str(version.path),
        })
    return {"store": str(store.root), "artifacts": rows, "warnings": warnings}


def artifact_summary(version: ArtifactVersion) -> dict[str, Any]:
    """What ``ncfm distill`` / ``ncfm resume`` report: ``{artifact, path, status, iterations,
    iterations_target, seconds, seconds_per_iteration (median of the last session), device,
    peak_memory_bytes, peak_memory_source, peak_memory, plan, flops_per_iteration, dataset, ipc,
    parent, pool_cached}`` (``peak_memory``, ``plan`` and ``flops_per_iteration`` are None for
    versions made before memory plans)."""
    manifest = version.manifest()
    timings = manifest.get("timings") if isinstance(manifest.get("timings"), dict) else {}
    config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
    pool = manifest.get("pool") if isinstance(manifest.get("pool"), dict) else {}
    return {
        "artifact": version.ref,
        "path": str(version.path),
        "status": manifest.get("status"),
        "iterations": manifest.get("iterations_done"),
        "iterations_target": manifest.get("iterations_target"),
        "seconds": timings.get("seconds"),
        "seconds_per_iteration": timings.get("seconds_per_iteration_median"),
        "device": manifest.get("device"),
        "peak_memory_bytes": manifest.get("peak_memory_bytes"),
        "peak_memory_source": manifest.get("peak_memory_source"),
        "peak_memory": manifest.get("peak_memory"),
        "plan": manifest.get("plan"),
        "flops_per_iteration": manifest.get("flops_per_iteration"),
        "dataset": config.get("dataset"),
        "ipc": config.get("ipc"),
        "parent": manifest.get("parent"),
        "pool_cached": pool.get("cached"),
    }
