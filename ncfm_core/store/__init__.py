"""The artifact store: versioned results on disk, written atomically, read defensively.

Layout under the root (see ``store_root``)::

    <root>/artifacts/<name>/v<N>/manifest.json                 the run's record (``store.record``)
    <root>/artifacts/<name>/v<N>/synset.safetensors            stored-form images, labels
    <root>/artifacts/<name>/v<N>/sampler.safetensors           psi weights
    <root>/artifacts/<name>/v<N>/checkpoint/state.safetensors  everything resume needs
    <root>/artifacts/<name>/v<N>/.run.lock                      held by the process distilling into it
    <root>/artifacts/<name>/.lock                              serialises manifest updates of <name>
    <root>/pools/<key>/pool.safetensors                        cached feature-extractor pools
    <root>/baselines/<key>.json                                cached full-data baselines

Rules this package keeps:

- Every file is written to ``<name>.<random>.tmp`` in its own directory, fsynced and then
  moved over the target with ``os.replace``: a crash leaves the old file or the new one.
- Nothing is loaded with pickle: tensors go through safetensors, everything else is JSON.
  Arbitrary nested states (optimiser state dicts, RNG states) are split into a flat
  tensor dict plus a JSON tree (``flatten_state``), so one checkpoint is one file.
- Any unreadable file becomes a one-line ``CorruptArtifactError`` naming the file.
- Version numbers are allocated with ``os.mkdir`` (atomic, fails if the directory exists),
  so two writers never share a version even without the per-name file lock; the lock
  only serialises read-modify-write of manifests and keeps allocation tidy.

Modules, each importing only those before it: ``files`` (atomic writes, JSON),
``tensors`` (safetensors), ``state`` (nested states), ``layout`` (every file and folder
name), ``record`` (a run's record: the typed manifest, its schema version, reading, migration,
writing), ``versions`` (names, versions, ``Store``), then the formats of a version's files:
``synset`` (synthetic set and sampler) and ``baselines`` (the full-data baseline cache).
"""

from ncfm_core.store.files import atomic_write_bytes, read_json, write_json
from ncfm_core.store.layout import (
    ARTIFACTS_DIR,
    BASELINES_DIR,
    CHECKPOINT_DIR,
    CHECKPOINT_FILE,
    CHECKPOINT_RELPATH,
    MANIFEST_FILE,
    NAME_LOCK_FILE,
    POOL_FILE,
    POOL_FORMAT,
    POOLS_DIR,
    RUN_LOCK_FILE,
    SAMPLER_FILE,
    SYNSET_FILE,
)
from ncfm_core.store.record import (
    SCHEMA_VERSION,
    STATUSES,
    Accuracy,
    BackendRecord,
    BaselineRecord,
    DatasetRecord,
    EvalRecord,
    EvalRequest,
    Normalization,
    MemoryFit,
    PeakMemoryRecord,
    PlanAsked,
    PlanChange,
    PlanKnobs,
    PlanRecord,
    PoolRecord,
    ProcessRecord,
    RunRecord,
    SamplerRecord,
    SessionTiming,
    SynsetRecord,
    Timings,
    describe_peak_source,
    read_record,
    write_record,
)
from ncfm_core.store.state import (
    STATE_TREE_FORMAT,
    STATE_TREE_KEY,
    flatten_state,
    load_state,
    save_state,
    unflatten_state,
)
from ncfm_core.store.synset import (
    SAMPLER_FORMAT,
    SYNSET_FORMAT,
    SyntheticSet,
    load_synset,
    save_sampler,
    save_synset,
)
from ncfm_core.store.tensors import file_sha256, load_tensors, save_tensors
from ncfm_core.store.versions import (
    NAME_PATTERN,
    ArtifactVersion,
    Store,
    looks_like_path,
    store_root,
    utc_now,
    validate_name,
)

__all__ = [
    "SCHEMA_VERSION",
    "Accuracy",
    "BackendRecord",
    "BaselineRecord",
    "DatasetRecord",
    "EvalRecord",
    "EvalRequest",
    "Normalization",
    "MemoryFit",
    "PeakMemoryRecord",
    "PlanAsked",
    "PlanChange",
    "PlanKnobs",
    "PlanRecord",
    "PoolRecord",
    "ProcessRecord",
    "RunRecord",
    "SamplerRecord",
    "SessionTiming",
    "SynsetRecord",
    "Timings",
    "describe_peak_source",
    "read_record",
    "write_record",
    "ARTIFACTS_DIR",
    "BASELINES_DIR",
    "CHECKPOINT_DIR",
    "CHECKPOINT_FILE",
    "CHECKPOINT_RELPATH",
    "MANIFEST_FILE",
    "NAME_LOCK_FILE",
    "NAME_PATTERN",
    "POOLS_DIR",
    "POOL_FILE",
    "POOL_FORMAT",
    "RUN_LOCK_FILE",
    "SAMPLER_FILE",
    "SAMPLER_FORMAT",
    "STATE_TREE_FORMAT",
    "STATE_TREE_KEY",
    "STATUSES",
    "SYNSET_FILE",
    "SYNSET_FORMAT",
    "SyntheticSet",
    "ArtifactVersion",
    "Store",
    "atomic_write_bytes",
    "file_sha256",
    "flatten_state",
    "load_state",
    "load_synset",
    "load_tensors",
    "looks_like_path",
    "read_json",
    "save_sampler",
    "save_state",
    "save_synset",
    "save_tensors",
    "store_root",
    "unflatten_state",
    "utc_now",
    "validate_name",
    "write_json",
]
