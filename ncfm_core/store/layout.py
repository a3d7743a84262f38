"""Every file and folder name of the artifact store, in one place (the layout is drawn in
the ``ncfm_core.store`` docstring)."""

ARTIFACTS_DIR = "artifacts"
POOLS_DIR = "pools"
MANIFEST_FILE = "manifest.json"
SYNSET_FILE = "synset.safetensors"
SAMPLER_FILE = "sampler.safetensors"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "state.safetensors"
POOL_FILE = "pool.safetensors"
CHECKPOINT_RELPATH = f"{CHECKPOINT_DIR}/{CHECKPOINT_FILE}"
"""The checkpoint's path relative to its version directory (its key in the manifest's ``sha256``)."""
