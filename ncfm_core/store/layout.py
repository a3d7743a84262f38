"""Every file and folder name of the artifact store, in one place (the layout is drawn in
the ``ncfm_core.store`` docstring), and the format tag of the one store file whose code lives
outside the store (the pool, written by ``ncfm_core.pool``)."""

ARTIFACTS_DIR = "artifacts"
POOLS_DIR = "pools"
BASELINES_DIR = "baselines"
MANIFEST_FILE = "manifest.json"
SYNSET_FILE = "synset.safetensors"
SAMPLER_FILE = "sampler.safetensors"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "state.safetensors"
POOL_FILE = "pool.safetensors"
CHECKPOINT_RELPATH = f"{CHECKPOINT_DIR}/{CHECKPOINT_FILE}"
"""The checkpoint's path relative to its version directory (its key in the manifest's ``sha256``)."""

NAME_LOCK_FILE = ".lock"
"""In ``artifacts/<name>/``: serialises read-modify-write of that name's manifests."""
RUN_LOCK_FILE = ".run.lock"
"""In a version directory: held (flock) by the process distilling into that version; the kernel
drops it if that process dies, so a lock nobody can take means the run is alive somewhere."""

POOL_FORMAT_VERSION = 2
"""2: every ConvNet variant built with the spec's width/norm (1: only 'convnet'). Part of every
pool's cache key, so pools made under an older build rule are retrained, not misread."""
POOL_FORMAT = f"ncfm-pool/{POOL_FORMAT_VERSION}"
"""The ``format`` metadata of ``pool.safetensors``."""
