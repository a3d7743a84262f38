"""One rank of ``ncfm_core.distill`` with nothing stored (``store=None``) under torchrun on the
CPU (gloo), the way ``tests/test_parallel.py`` runs it: ``torchrun --nproc_per_node=2
tests/torchrun_api_result_rank.py OUT_DIR``. Every rank must get the whole result, although the
files were written only into rank 0's temporary folder. Writes ``OUT_DIR/rank<RANK>.json``:
``{"ended": "returned" or the error, "images_sha256", "iterations_done"}``."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

import ncfm_core
from ncfm_core import parallel

torch.set_num_threads(1)
seen: dict = {}
try:
    result = ncfm_core.distill("digits", 1, device="cpu", iterations=2, pool_size=1, pool_epochs=0, width=8,
                               real_per_class=4, num_freqs=16)
    seen["ended"] = "returned"
    seen["images_sha256"] = hashlib.sha256(result.images.contiguous().numpy().tobytes()).hexdigest()
    seen["iterations_done"] = result.record.iterations_done
except Exception as err:  # noqa: BLE001 - what ended the call is the result
    seen["ended"] = f"{type(err).__name__}: {err}"
Path(sys.argv[1], f"rank{os.environ['RANK']}.json").write_text(json.dumps(seen))
parallel.finish()  # leave the group together, so neither rank's exit aborts the other
