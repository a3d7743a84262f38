"""Several processes (ncfm_core.parallel), on CPU with gloo and 2 ranks.

In-process: the class split, the repeat split, cutting and merging shard states. Two spawned
gloo processes: the parallel pool equals the sequential one, a 2-rank class-sharded distillation
follows the single-process one (up to the order of a float sum), its gathered state resumes in
one process, and a 2-rank evaluation equals the single-process one. Real ``torchrun``
subprocesses: a 2-rank ``ncfm distill`` loses a rank mid-run, fails, and ``ncfm resume`` (2
ranks) finishes it with all 10 classes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from ncfm_core.config import make_config
from ncfm_core.data import load_dataset
from ncfm_core.distill import Distiller
from ncfm_core.loop_state import owned_rows_of_state
from ncfm_core.errors import ConfigError
from ncfm_core.jobs.plan import decide_precisions
from ncfm_core.parallel import DistContext, ShardedDistiller, merge_shard_states, repeats_of_rank, shard_classes
from ncfm_core.pool import PoolSpec, train_pool
from ncfm_core.store import load_state, load_synset

REPO_ROOT = Path(__file__).resolve().parents[1]
POLL_LIMIT_S = 240


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------- in-process units


@pytest.mark.parametrize("num_classes, world", [(10, 2), (10, 3), (7, 7), (100, 8), (5, 1)])
def test_shard_classes_are_contiguous_balanced_and_cover_every_class_once(num_classes, world):
    blocks = [shard_classes(num_classes, world, rank) for rank in range(world)]
    assert [c for block in blocks for c in block] == list(range(num_classes))  # in order, once each
    sizes = [len(block) for block in blocks]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert sizes == sorted(sizes, reverse=True)  # the extra classes go to the first ranks


def test_shard_classes_reference_values_and_errors():
    assert [shard_classes(10, 3, r) for r in range(3)] == [range(0, 4), range(4, 7), range(7, 10)]
    with pytest.raises(ConfigError, match="at most 3 processes"):
        shard_classes(3, 4, 0)
    with pytest.raises(ValueError):
        shard_classes(10, 2, 2)


@pytest.mark.parametrize("repeats, world", [(5, 2), (3, 2), (1, 3), (8, 8), (10, 3), (4, 1)])
def test_repeats_of_rank_are_contiguous_balanced_blocks_covering_each_repeat_once(repeats, world):
    blocks = [repeats_of_rank(repeats, world, rank) for rank in range(world)]
    assert [r for block in blocks for r in block] == list(range(repeats))
    sizes = [len(block) for block in blocks]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_repeats_of_rank_reference_values_and_errors():
    assert [list(repeats_of_rank(5, 2, r)) for r in range(2)] == [[0, 1, 2], [3, 4]]
    assert [list(repeats_of_rank(2, 3, r)) for r in range(3)] == [[0], [1], []]
    with pytest.raises(ValueError):
        repeats_of_rank(5, 2, 2)


def test_cut_then_merge_of_a_state_is_the_identity():
    """What rank r loads (owned_rows_of_state) and what rank 0 writes (merge_shard_states)."""
    generator = torch.Generator().manual_seed(0)
    rows, ipc, num_classes = 10 * 2, 2, 10
    state = {
        "images": torch.rand(rows, 1, 4, 4, generator=generator),
        "image_optimizer": {"state": {0: {"step": torch.tensor(3.0),
                                          "exp_avg": torch.rand(rows, 1, 4, 4, generator=generator),
                                          "exp_avg_sq": torch.rand(rows, 1, 4, 4, generator=generator)}},
                            "param_groups": [{"lr": 0.1, "params": [0]}]},
        "iteration": 3,
    }
    shards = []
    for rank in range(3):
        block = shard_classes(num_classes, 3, rank)
        cut = owned_rows_of_state(state, slice(block.start * ipc, block.stop * ipc), rows)
        assert cut["images"].shape[0] == len(block) * ipc
        assert torch.equal(cut["images"], state["images"][block.start * ipc: block.stop * ipc])
        shards.append(cut)
    merged = merge_shard_states(shards)
    assert merged["world_size"] == 3 and merged["iteration"] == 3
    assert torch.equal(merged["images"], state["images"])
    for name in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(merged["image_optimizer"]["state"][0][name], state["image_optimizer"]["state"][0][name])


def test_a_rank_computes_with_the_plans_precision_and_refuses_fp16_and_auto():
    """ShardedDistiller takes the precision rank 0's plan decided (sent in its order): it checks
    (no fp16 under several processes: per-rank loss scalers would skip different steps) and
    never decides "auto" itself. Both refusals come before any collective."""
    dataset, config = _tiny_setup()
    config = config.replace(pool_epochs=0)
    pool = train_pool(PoolSpec.from_config(config, dataset), dataset, "cpu")
    ctx = DistContext(rank=1, world_size=2, backend="gloo")  # no group: nothing here may communicate
    decided = decide_precisions(config, "cpu", world_size=2)
    with pytest.raises(ConfigError, match="fp16 is not supported with several processes"):
        ShardedDistiller(decided.replace(precision="fp16"), dataset, pool, torch.device("cpu"), ctx, checkpoint_every=2)
    with pytest.raises(ConfigError, match=r"Distiller was given precision 'auto'; .*decide_precisions"):
        ShardedDistiller(decided.replace(precision="auto"), dataset, pool, torch.device("cpu"), ctx, checkpoint_every=2)
    rank_one = ShardedDistiller(decided, dataset, pool, torch.device("cpu"), ctx, checkpoint_every=2)
    assert (rank_one.precision, rank_one.cf_precision) == ("fp32", "fp32") and rank_one.classes == range(2, 4)


# ----------------------------------------------------------------------------- 2 gloo processes


def _tiny_setup():
    dataset = load_dataset("fake", num_classes=4, channels=1, image_size=8, train_per_class=12, test_per_class=4)
    config = make_config("fake", 2, factor=2, width=8, pool_size=3, pool_epochs=1, pool_batch=16,
                         real_per_class=6, num_freqs=16, iterations=4, seed=5)
    return dataset, config


def _two_rank_worker(rank: int, port: int, out_dir: str) -> None:
    """Rank ``rank`` of 2: pool, sharded distillation, evaluation; rank 0 also computes the
    single-process references and saves both to ``out_dir``."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from ncfm_core import parallel
    from ncfm_core.evaluate import evaluate_images, protocol_config

    device = torch.device("cpu")
    ctx = parallel.init_from_env(device)
    assert (ctx.rank, ctx.world_size, ctx.backend) == (rank, 2, "gloo")
    dataset, config = _tiny_setup()
    config = decide_precisions(config, device)  # as rank 0's plan does, for this world of 2
    spec = PoolSpec.from_config(config, dataset)
    pool, cached = parallel.distributed_load_or_train_pool(spec, dataset, device,
                                                              cache_dir=Path(out_dir) / "pool")
    sharded = parallel.ShardedDistiller(config, dataset, pool, device, ctx, checkpoint_every=2)  # to config.iterations (4)
    assert list(sharded.labels) == [c for c in shard_classes(4, 2, rank) for _ in range(config.ipc)]
    sharded.step()
    sharded.step()
    at_two = sharded.state_dict()  # a checkpoint: every rank gathers
    sharded.step()
    with pytest.raises(RuntimeError, match="not a point"):
        sharded.state_dict()  # iteration 3 is no gather point: refuse rather than hang
    sharded.step()
    final_images, final_labels = sharded.synthetic_set() if rank == 0 else (None, None)
    if rank != 0:
        sharded.gather()  # rank 0's synthetic_set() gathered

    eval_config = protocol_config("dsa", epochs=2, repeats=3, width=8, batch_size=16, seed=11)
    eval_images = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    eval_labels = torch.arange(4).repeat_interleave(2)
    events: list[tuple[int, float]] = []
    two_rank_eval = parallel.evaluate_images_distributed(eval_images, eval_labels, dataset, eval_config, device,
                                                            on_repeat=lambda r, acc: events.append((r, acc)))
    # Own repeats as they finish, then the other rank's after the gather.
    own = list(parallel.repeats_of_rank(3, 2, rank))
    assert [r for r, _ in events] == own + [r for r in range(3) if r not in own]
    assert sorted(events) == list(enumerate(two_rank_eval.runs))

    if rank != 0:
        assert at_two is None
        return
    reference_pool = train_pool(spec, dataset, "cpu")
    single = Distiller(config, dataset, reference_pool, "cpu")
    single.run(4)
    resumed = Distiller(config, dataset, reference_pool, "cpu")  # world size 2 -> 1
    resumed.load_state_dict(at_two)
    resumed.run(4)
    single_eval = evaluate_images(eval_images, eval_labels, dataset, eval_config, "cpu")
    torch.save({
        "cached": cached,
        "pool_equal": all(torch.equal(a[k], b[k]) for a, b in zip(pool.trained_states, reference_pool.trained_states)
                          for k in a) and len(pool) == len(reference_pool),
        "at_two_world_size": at_two["world_size"],
        "final_images": final_images, "final_labels": final_labels,
        "single_images": single.images.detach().clone(), "single_labels": single.labels.clone(),
        "resumed_images": resumed.images.detach().clone(),
        "sharded_curve_last": sharded._last["loss"], "single_curve_last": single._last["loss"],
        "two_rank_runs": two_rank_eval.runs, "two_rank_seeds": two_rank_eval.seeds,
        "single_runs": single_eval.runs, "single_seeds": single_eval.seeds,
    }, Path(out_dir) / "result.pt")


def test_two_gloo_ranks_pool_distill_resume_and_eval_match_one_process(tmp_path):
    mp.spawn(_two_rank_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    result = torch.load(tmp_path / "result.pt")
    assert result["cached"] is False and result["pool_equal"]  # member i trained on rank i % 2 = sequential
    assert (tmp_path / "pool" / "pool.safetensors").is_file()  # rank 0 cached it
    assert result["at_two_world_size"] == 2
    assert torch.equal(result["final_labels"], result["single_labels"])
    # Only the order of the float sums over ranks differs (psi's gradient, the loss totals).
    torch.testing.assert_close(result["final_images"], result["single_images"], rtol=0, atol=1e-4)
    assert not torch.equal(result["single_images"][:1], result["single_images"][-1:])  # a non-trivial set
    torch.testing.assert_close(result["resumed_images"], result["single_images"], rtol=0, atol=1e-4)
    assert result["sharded_curve_last"] == pytest.approx(result["single_curve_last"], rel=1e-5)
    # Evaluation: each repeat is seeded by its index, wherever it runs: exactly equal.
    assert result["two_rank_seeds"] == result["single_seeds"] == [11, 12, 13]
    assert result["two_rank_runs"] == result["single_runs"]


# ----------------------------------------------------------------------------- torchrun processes


def torchrun(store: Path, *args: str, entry_point: bool = False, pause_at: int | None = None) -> subprocess.Popen:
    """``torchrun --nproc_per_node=2 -m ncfm_cli ...``, or with the installed ``ncfm`` script.
    With ``pause_at`` rank 0 waits after its checkpoint at that iteration until it is stopped
    (``NCFM_PAUSE_AFTER_CHECKPOINT``; the other ranks wait for it in their next collective)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("NCFM_PAUSE_AFTER_CHECKPOINT", None)
    if pause_at is not None:
        env["NCFM_PAUSE_AFTER_CHECKPOINT"] = str(pause_at)
    program = [shutil.which("ncfm") or "ncfm"] if entry_point else ["-m", "ncfm_cli"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               *program, "--store", str(store), *args]
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def worker_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of the launcher's child with RANK=rank, from /proc (Linux)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == launcher.pid and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no worker with RANK={rank} under pid {launcher.pid}")


def wait_for_checkpoint(proc: subprocess.Popen, manifest_path: Path, iterations: int) -> None:
    deadline = time.monotonic() + POLL_LIMIT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before the kill:\n{proc.communicate()[1]}")
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        if (manifest.get("checkpoint_iteration") or 0) >= iterations:
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no checkpoint with {iterations} iterations after {POLL_LIMIT_S} s")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker pids in /proc")
def test_torchrun_kill_one_rank_then_resume_with_two_ranks(tmp_path):
    store = tmp_path / "store"
    manifest_path = store / "artifacts" / "twogpu" / "v1" / "manifest.json"
    run = torchrun(store, "distill", "digits", "--name", "twogpu", "--ipc", "1", "--factor", "1",
                   "--iterations", "20", "--checkpoint-every", "2", "--pool-size", "2", "--pool-epochs", "1",
                   "--freqs", "16", "--real-per-class", "4", "--width", "8", "--device", "cpu", pause_at=2)
    wait_for_checkpoint(run, manifest_path, 2)
    os.kill(worker_pid(run, 1), signal.SIGKILL)
    _, stderr = run.communicate(timeout=POLL_LIMIT_S)
    assert run.returncode != 0, stderr
    killed = json.loads(manifest_path.read_text())
    # "failed" when rank 0 records the peer's crash; "running" if torchrun stops it first.
    assert killed["status"] in ("failed", "running") and killed["world_size"] == 2
    # The state file, not the manifest: rank 0 may die between writing one and the other.
    checkpoint = load_state(manifest_path.parent / "checkpoint" / "state.safetensors")
    done = int(checkpoint["iteration"])
    assert done == 2 == int(killed["checkpoint_iteration"])  # rank 0 paused there until the kill
    assert checkpoint["world_size"] == 2 and checkpoint["images"].shape[0] == 10  # every class, gathered

    resume = torchrun(store, "--json", "resume", "twogpu", "--iterations", str(done + 2), "--device", "cpu")
    stdout, stderr = resume.communicate(timeout=POLL_LIMIT_S)
    assert resume.returncode == 0, stderr
    assert f"continuing twogpu@v1 from iteration {done}" in stderr
    summary = json.loads(stdout)  # rank 0 alone prints: one JSON document
    assert summary["status"] == "complete" and summary["iterations"] == done + 2
    manifest = json.loads(manifest_path.read_text())
    assert manifest["world_size"] == 2 and manifest["status"] == "complete"
    synset = load_synset(manifest_path.parent / "synset.safetensors")
    assert synset.images.shape[0] == 10 and synset.num_classes == 10
    assert torch.equal(synset.labels, torch.arange(10))


def ncfm(store: Path, *args: str) -> subprocess.CompletedProcess:
    """One process, as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ncfm_cli", "--store", str(store), *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=POLL_LIMIT_S)


def test_torchrun_eval_spreads_repeats_and_equals_one_process(tmp_path):
    """`ncfm distill --eval` and `ncfm eval` on 2 ranks. The latter (synthetic set, random and
    full baselines, soft labels from the artifact's pool) gives exactly the single-process
    accuracies, prints one JSON document and records one eval; an error is reported once, by
    rank 0."""
    store = tmp_path / "store"
    made = torchrun(store, "--json", "distill", "digits", "--name", "tiny", "--ipc", "1", "--factor", "1",
                    "--iterations", "2", "--pool-size", "2", "--pool-epochs", "1", "--freqs", "16",
                    "--real-per-class", "4", "--width", "8", "--device", "cpu",
                    "--eval", "--eval-repeats", "2", "--eval-epochs", "1", "--eval-protocol", "dsa")
    stdout, stderr = made.communicate(timeout=POLL_LIMIT_S)
    assert made.returncode == 0, stderr
    distilled = json.loads(stdout)  # distill --eval: the evaluation joined by both ranks too
    assert distilled["status"] == "complete" and distilled["eval"]["world_size"] == 2
    assert len(distilled["eval"]["accuracy"]["runs"]) == 2
    synset = load_synset(store / "artifacts" / "tiny" / "v1" / "synset.safetensors")
    assert torch.equal(synset.labels, torch.arange(10))  # every class, from both ranks' shards
    eval_args = ("--json", "eval", "tiny", "--protocol", "dsa", "--repeats", "3", "--epochs", "10", "--width", "8",
                 "--baseline", "random", "--baseline", "full", "--soft-labels", "--device", "cpu")
    one_run = ncfm(store, *eval_args)
    assert one_run.returncode == 0, one_run.stderr
    one = json.loads(one_run.stdout)
    for cached in (store / "baselines").glob("*.json"):
        cached.unlink()  # the 2-rank run trains the full baseline again rather than reading it
    spread = torchrun(store, *eval_args)
    stdout, stderr = spread.communicate(timeout=POLL_LIMIT_S)
    assert spread.returncode == 0, stderr
    assert "terminate called" not in stderr
    two = json.loads(stdout)  # one document: only rank 0 prints

    assert (two["world_size"], one["world_size"]) == (2, 1)
    assert two["seeds"] == one["seeds"] == [0, 1, 2]
    assert two["accuracy"]["runs"] == one["accuracy"]["runs"]
    for kind in ("random", "full"):
        assert two["baselines"][kind]["accuracy"]["runs"] == one["baselines"][kind]["accuracy"]["runs"], kind
    assert two["baselines"]["full"]["cached"] is False and one["baselines"]["full"]["cached"] is False
    assert two["teacher"]["member"] == one["teacher"]["member"] == 0 and two["teacher"]["pool_cached"]
    assert two["protocol"] == one["protocol"]
    assert len(set(one["accuracy"]["runs"])) > 1  # three different networks, not one result thrice
    manifest = json.loads((store / "artifacts" / "tiny" / "v1" / "manifest.json").read_text())
    assert [record["world_size"] for record in manifest["evals"]] == [2, 1, 2]  # rank 0 alone appended

    missing = torchrun(store, "eval", "nope", "--device", "cpu", entry_point=True)  # the `ncfm` script too
    _, stderr = missing.communicate(timeout=POLL_LIMIT_S)
    assert missing.returncode != 0
    assert stderr.count("error: no artifact named 'nope'") == 1, stderr


def test_torchrun_api_distill_without_a_store_returns_the_result_on_every_rank(tmp_path):
    """``ncfm_core.distill(..., store=None)`` under torchrun: the result is written only into rank
    0's temporary folder, yet every rank gets it (rank 0 reads it and sends it); each rank once
    looked for it in its own empty folder and failed with "not found". See
    tests/torchrun_api_result_rank.py."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               str(REPO_ROOT / "tests" / "torchrun_api_result_rank.py"), str(tmp_path)]
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=POLL_LIMIT_S)
    rank0, rank1 = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert rank0["ended"] == rank1["ended"] == "returned", (rank0, rank1, run.stderr[-2000:])
    assert rank0["images_sha256"] == rank1["images_sha256"] and rank0["iterations_done"] == rank1["iterations_done"] == 2
    assert run.returncode == 0, run.stderr


def test_torchrun_api_calls_resolve_each_ranks_own_gpu(tmp_path):
    """``ncfm_core.distill(...)`` and ``ncfm_core.evaluate(images in memory)`` under torchrun on a
    simulated machine of two GPUs: the device is resolved at the job boundary, with LOCAL_RANK, so
    rank 1 computes on cuda:1 (the API once resolved it itself, before the boundary, and put every
    rank on cuda:0). See tests/torchrun_api_rank.py for what each rank records."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               str(REPO_ROOT / "tests" / "torchrun_api_rank.py"), str(tmp_path)]
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=POLL_LIMIT_S)
    assert run.returncode == 0, run.stderr
    rank0, rank1 = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    for rank in (rank0, rank1):  # each call really reached the point where the work starts
        assert set(rank["ended"]) == {"distill", "evaluate"}
        assert all("stopped where the work would start" in how for how in rank["ended"].values()), rank["ended"]
    assert rank0["joined"] == ["cuda:0", "cuda:0"] and rank0["computed"] == {"distill": "cuda:0",
                                                                             "evaluate": "cuda:0"}
    assert rank1["joined"] == ["cuda:1", "cuda:1"]
    assert rank1["computed"] == {}  # a follower runs rank 0's orders, never the job itself
