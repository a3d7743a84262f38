"""One rank of ``ncfm_core.distill`` and ``ncfm_core.evaluate`` (images in memory) under
torchrun, on a CUDA machine of two GPUs simulated on the CPU (``tests/test_parallel.py`` runs
it: ``torchrun --nproc_per_node=2 tests/torchrun_api_rank.py OUT_DIR``).

It records the device each rank's job received and stops each job where the work would start,
so no CUDA kernel is needed: ranks join the process group on gloo whatever device they
resolved (what the job boundary hands ``init_from_env`` is recorded first), and rank 0's job
body stops at the loop (``distill_into``) or at the evaluation (``evaluate_synset``) after
recording the device it would compute on. Writes ``OUT_DIR/rank<RANK>.json``:
``{"joined": [device per call], "computed": {call: device} (rank 0), "ended": {call: message}}``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import simulated_cuda

simulated_cuda.install()  # before ncfm_core resolves anything

import torch  # noqa: E402

import ncfm_core  # noqa: E402
from ncfm_core import parallel  # noqa: E402
from ncfm_core.jobs import distill as distill_module  # noqa: E402
from ncfm_core.jobs import eval as eval_module  # noqa: E402
from ncfm_core.parallel import protocol  # noqa: E402

STOP = "stopped where the work would start"
seen: dict = {"joined": [], "computed": {}, "ended": {}}


class StopBeforeTheWork(Exception):
    pass


def join_on_gloo(device: torch.device) -> parallel.DistContext:
    seen["joined"].append(str(device))
    return real_init_from_env(torch.device("cpu"))  # the simulated GPUs have no NCCL


def stop_the_run(store, version, config, dataset, spec, device, **kwargs):
    seen["computed"]["distill"] = str(device)
    raise StopBeforeTheWork(STOP)


def stop_the_evaluation(images, labels, factor, dataset, config, device, *args, **kwargs):
    seen["computed"]["evaluate"] = str(device)
    raise StopBeforeTheWork(STOP)


real_init_from_env = protocol.init_from_env
protocol.init_from_env = join_on_gloo
distill_module.distill_into = stop_the_run
eval_module.evaluate_synset = stop_the_evaluation

images = torch.rand(20, 1, 16, 16, generator=torch.Generator().manual_seed(0))
labels = torch.arange(10).repeat(2)
calls = {
    "distill": lambda: ncfm_core.distill("digits", 1, iterations=2, pool_size=1, pool_epochs=0),
    "evaluate": lambda: ncfm_core.evaluate((images, labels), "digits", epochs=1, repeats=2),
}
for name, call in calls.items():
    try:
        call()
        seen["ended"][name] = "returned"
    except Exception as err:  # noqa: BLE001 - what ended the call is the result
        seen["ended"][name] = f"{type(err).__name__}: {err}"
Path(sys.argv[1], f"rank{os.environ['RANK']}.json").write_text(json.dumps(seen))
parallel.finish()  # leave the group together, so neither rank's exit aborts the other
