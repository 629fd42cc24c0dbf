"""Data-parallel `train` on 2 gloo ranks (torch.multiprocessing, CPU): identical codebooks on every rank, the same
model as one rank with the whole batch, resume across world sizes, accumulation, bad input and a rank dying."""

from __future__ import annotations

import datetime
import json
import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bridge_models import boot, save_hf_folder
from safetensors.torch import load_file, save_file
from tiny_models import assert_same_state, make_model

import cbinterp
from cbinterp import attach_codebooks, get_codebooks, kmeans_init_codebooks
from cbinterp.core import tl_compat as tc
from cbinterp.core.training.loggers import JSONLLogger, read_jsonl
from cbinterp.core.training.train import TRAINER_FILE, TrainConfig, train
from cbinterp.tasks.fsm import FSM

FSM_TASK = FSM.random(6, 2, 10, seed=0)
BATCH = 8  # the global batch: 4 rows per rank with 2 ranks
WORLD = 2

pytestmark = pytest.mark.usefixtures("one_thread")


def batches():
    return FSM_TASK.token_batches(BATCH, 16, seed=0)


def config(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(steps=8, lr=3e-3, progress=False, log_every=2, schedule="constant"), **kw})


def with_codebooks(model, replace: bool = True):
    """Codebooks at every head and MLP; with `replace`, dead codes are replaced every 3 steps (they are, here)."""
    extra = dict(dead_after=2, dead_check_every=3) if replace else {}
    return attach_codebooks(model, ["attn", "mlp"], n_codes=16, **extra)


def fresh(replace: bool = True):
    return with_codebooks(make_model(seed=0), replace)


def fresh_bridge(tmp: Path):
    """The GPT-2 bridge of the folder the parent wrote, with codebooks (the ranks boot it alike)."""
    return with_codebooks(boot(tmp / "hf"))


def state_of(model) -> dict:
    return {k: v.detach().clone().contiguous() for k, v in tc.state_dict(model).items()}


def count_replacements(monkeypatch_target: list):
    """Wrap Codebook.replace_dead_codes to record how many codes each call replaced."""
    from cbinterp.core.codebooks.codebook import Codebook

    real = Codebook.replace_dead_codes

    def counted(self, *args, **kwargs):
        n = real(self, *args, **kwargs)
        monkeypatch_target.append(n)
        return n

    Codebook.replace_dead_codes = counted


# -- the rank side: scenarios run in each spawned process ------------------------------------------------------
def scenario_same(rank: int, tmp: Path) -> dict:
    replaced: list[int] = []
    count_replacements(replaced)
    model = fresh()
    log = JSONLLogger(tmp / f"log_rank{rank}.jsonl")
    result = train(model, batches(), config(), loggers=[log])
    save_file(state_of(model), tmp / f"same_rank{rank}.safetensors")
    return {"losses": result.losses, "replaced": sum(replaced)}


def scenario_shard_fn(rank: int, tmp: Path) -> dict:
    fn = batches()

    def mine(step, rank, world_size):  # each rank draws only its own rows
        per = BATCH // world_size
        return fn(step)[rank * per : (rank + 1) * per]

    model = fresh()
    result = train(model, mine, config(checkpoint_every=4, checkpoint_dir=str(tmp / "ck_shard")))
    save_file(state_of(model), tmp / f"shard_rank{rank}.safetensors")
    return {"losses": result.losses}


def scenario_iterable(rank: int, tmp: Path) -> dict:
    """An iterable of global batches: each rank takes its rows of each, as from fn(step)."""
    fn = batches()
    model = fresh()
    train(model, iter([fn(step) for step in range(8)]), config())
    save_file(state_of(model), tmp / f"iterable_rank{rank}.safetensors")
    return {}


def token_table() -> torch.Tensor:
    return FSM_TASK.sample(40, 16, seed=5).tokens


def scenario_tensor(rank: int, tmp: Path) -> dict:
    """A token tensor with batch_size: the seeded global batch, each rank its share."""
    model = fresh()
    train(model, token_table(), config(batch_size=BATCH))
    save_file(state_of(model), tmp / f"tensor_rank{rank}.safetensors")
    return {}


def scenario_half(rank: int, tmp: Path) -> dict:
    """4 of 8 steps on 2 ranks, checkpointed: the parent resumes it on one rank."""
    train(fresh(replace=False), batches(), config(steps=4, checkpoint_every=2, checkpoint_dir=str(tmp / "ck2")))
    return {}


def scenario_resume(rank: int, tmp: Path) -> dict:
    """Resume the parent's 1-rank checkpoint (4 steps) to 8 on 2 ranks."""
    model = fresh(replace=False)
    result = train(model, batches(), config(checkpoint_every=2, checkpoint_dir=str(tmp / "ck1")))
    save_file(state_of(model), tmp / f"resume_rank{rank}.safetensors")
    return {"losses": result.losses, "resumed_from": result.resumed_from}


def scenario_accumulate(rank: int, tmp: Path) -> dict:
    model = fresh(replace=False)
    train(model, batches(), config(steps=4, accumulate=2))
    save_file(state_of(model), tmp / f"accumulate_rank{rank}.safetensors")
    return {}


def scenario_indivisible(rank: int, tmp: Path) -> dict:
    seven = lambda step: batches()(step)[:7]  # noqa: E731
    out = {}
    for name, data, cfg in (("fn", seven, config(steps=2)), ("tensor", batches()(0), config(steps=2, batch_size=5))):
        try:
            train(fresh(), data, cfg)
        except ValueError as err:
            out[name] = str(err)
    return out


def scenario_die(rank: int, tmp: Path) -> dict:
    fn = batches()

    def dying(step):
        if rank == 1 and step == 5:
            os._exit(3)  # a rank killed mid-run: no exception, no clean shutdown
        return fn(step)

    train(fresh(), dying, config(checkpoint_every=2, checkpoint_dir=str(tmp / "ck_die")))
    return {}


def scenario_bridge(rank: int, tmp: Path) -> dict:
    model = fresh_bridge(tmp)
    result = train(model, batches(), config())
    save_file(state_of(model), tmp / f"bridge_rank{rank}.safetensors")
    return {"losses": result.losses}


def kmeans_tokens(seed: int) -> torch.Tensor:
    return FSM_TASK.sample(16, 16, seed=100 + seed).tokens


def scenario_kmeans(rank: int, tmp: Path) -> dict:
    """Each rank passes other tokens: rank 0's k-means codes end up on every rank."""
    model = fresh(replace=False)
    kmeans_init_codebooks(model, kmeans_tokens(rank), iters=3, progress=False)
    save_file(state_of(model), tmp / f"kmeans_rank{rank}.safetensors")
    return {}


SCENARIOS = {
    name[len("scenario_") :]: fn
    for name, fn in dict(globals()).items()
    if name.startswith("scenario_") and callable(fn)
}


def _worker(rank: int, world: int, tmp: str, names: list[str]) -> None:
    tmp = Path(tmp)
    import time

    start = time.perf_counter()
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp / 'rendezvous'}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    results = {}
    try:
        for name in names:
            results[name] = SCENARIOS[name](rank, tmp)
            results.setdefault("seconds", {})[name] = time.perf_counter() - start
    except BaseException as err:
        results["error"] = {"type": type(err).__name__, "message": str(err), "trace": traceback.format_exc()}
    (tmp / f"result_rank{rank}.json").write_text(json.dumps(results))
    if "error" not in results:
        dist.destroy_process_group()


def run_ranks(tmp: Path, names: list[str], world: int = WORLD) -> list[dict]:
    """Run the scenarios in `world` spawned gloo ranks; each rank's results (or its error)."""
    tmp.mkdir(parents=True, exist_ok=True)
    # fork: the ranks inherit the imported torch and cbinterp (a spawned rank spends ~10 s importing them); torch's
    # fork handler gives each child a fresh one-thread pool, and no process group exists in this process.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.start_processes(_worker, args=(world, str(tmp), names), nprocs=world, join=False, start_method=method)
    for p in ctx.processes:
        p.join(timeout=300)
        if p.is_alive():
            p.kill()
            raise AssertionError("a rank hung")
    out = []
    for r in range(world):
        path = tmp / f"result_rank{r}.json"
        out.append(json.loads(path.read_text()) if path.exists() else {"exit": ctx.processes[r].exitcode})
    return out


def load_state(path: Path) -> dict:
    return load_file(path)


# -- the parent side -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ranks_run(tmp_path_factory):
    """One spawn of 2 ranks running every quick scenario (a spawn costs seconds; the scenarios less)."""
    tmp = tmp_path_factory.mktemp("ddp")
    # the 1-rank checkpoint that the 2 ranks resume (4 of 8 steps)
    train(fresh(replace=False), batches(), config(steps=4, checkpoint_every=2, checkpoint_dir=str(tmp / "ck1")))
    results = run_ranks(
        tmp, ["same", "shard_fn", "iterable", "tensor", "half", "resume", "accumulate", "indivisible", "kmeans"]
    )
    for r, res in enumerate(results):
        assert "error" not in res and "exit" not in res, (r, res)
    return tmp, results


def test_codebooks_bit_identical_on_every_rank(ranks_run):
    tmp, results = ranks_run
    a, b = load_state(tmp / "same_rank0.safetensors"), load_state(tmp / "same_rank1.safetensors")
    assert a.keys() == b.keys() and any(k.endswith(".counts") for k in a)
    for k in a:  # weights and buffers (counts, steps_since_used, train_steps)
        assert torch.equal(a[k], b[k]), k
    same = [res["same"] for res in results]
    assert same[0]["replaced"] > 0 and same[0]["replaced"] == same[1]["replaced"]  # replacement did happen
    assert same[0]["losses"] == same[1]["losses"]
    cb_steps = [v for k, v in a.items() if k.endswith("train_steps")]
    assert cb_steps and all(int(v) == 8 for v in cb_steps)


def test_two_ranks_equal_one_rank_with_the_whole_batch(ranks_run):
    """Gradients averaged, counts summed, dead codes replaced from the gathered inputs: the 1-rank run, to rounding."""
    tmp, results = ranks_run
    model = fresh()
    one = train(model, batches(), config())
    two = load_state(tmp / "same_rank0.safetensors")
    one_state = state_of(model)
    assert_same_state(one_state, two, atol=1e-5)  # the integer buffers (usage counts) exactly
    assert one.losses == pytest.approx(results[0]["same"]["losses"], abs=1e-5)
    total = sum(int(v.sum()) for k, v in two.items() if k.endswith(".counts"))
    tokens = 8 * BATCH * 16
    n_codebooks = len(get_codebooks(model))
    heads = model.cfg.n_heads
    assert total == tokens * (n_codebooks // 2 * heads + n_codebooks // 2)  # every token of both ranks counted


def test_shard_fn_gives_each_rank_its_rows(ranks_run):
    tmp, _ = ranks_run
    a, b = load_state(tmp / "shard_rank0.safetensors"), load_state(tmp / "same_rank0.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # its checkpoint holds the global batches' fingerprints: one rank with fn(step) resumes it
    with pytest.warns(Warning, match="Resuming"):
        result = train(fresh(), batches(), config(steps=10, checkpoint_dir=str(tmp / "ck_shard")))
    assert result.resumed_from == 8


def test_iterable_is_sharded_like_a_batch_function(ranks_run):
    tmp, _ = ranks_run
    a, b = load_state(tmp / "iterable_rank0.safetensors"), load_state(tmp / "same_rank0.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_token_tensor_gives_each_rank_its_share_of_the_seeded_batch(ranks_run):
    tmp, _ = ranks_run
    a, b = load_state(tmp / "tensor_rank0.safetensors"), load_state(tmp / "tensor_rank1.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    model = fresh()
    train(model, token_table(), config(batch_size=BATCH))
    assert_same_state(state_of(model), a, atol=1e-5)


def test_two_rank_checkpoint_resumes_on_one_rank(ranks_run):
    tmp, _ = ranks_run
    assert json.loads((tmp / "ck2" / TRAINER_FILE).read_text())["world_size"] == 2
    straight = fresh(replace=False)
    expected = train(straight, batches(), config())
    model = fresh(replace=False)
    with pytest.warns(Warning, match="Resuming"):
        resumed = train(model, batches(), config(checkpoint_dir=str(tmp / "ck2")))
    assert resumed.resumed_from == 4
    assert resumed.losses == pytest.approx(expected.losses, abs=1e-5)
    assert_same_state(state_of(model), state_of(straight), atol=1e-5)


def test_one_rank_checkpoint_resumes_on_two_ranks(ranks_run):
    tmp, results = ranks_run
    straight = fresh(replace=False)
    expected = train(straight, batches(), config())
    assert results[0]["resume"]["resumed_from"] == 4 == results[1]["resume"]["resumed_from"]
    assert results[0]["resume"]["losses"] == pytest.approx(expected.losses, abs=1e-5)
    assert_same_state(load_state(tmp / "resume_rank0.safetensors"), state_of(straight), atol=1e-5)
    assert json.loads((tmp / "ck1" / TRAINER_FILE).read_text())["world_size"] == 2  # rewritten by the 2 ranks


def test_accumulate_on_two_ranks_equals_the_whole_batch(ranks_run):
    tmp, _ = ranks_run
    model = fresh(replace=False)
    train(model, batches(), config(steps=4))
    assert_same_state(load_state(tmp / "accumulate_rank0.safetensors"), state_of(model), atol=1e-5)


def test_indivisible_batch_is_a_clear_error(ranks_run):
    _, results = ranks_run
    for res in results:  # on every rank: none waits for the other
        assert "7 rows" in res["indivisible"]["fn"] and "2 ranks" in res["indivisible"]["fn"]
        assert (
            "batch_size of 5 rows" in res["indivisible"]["tensor"] and "multiple of 2" in res["indivisible"]["tensor"]
        )


def test_only_rank_zero_logs(ranks_run):
    tmp, _ = ranks_run
    records = read_jsonl(tmp / "log_rank0.jsonl")
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    assert all("mse/blocks.0.hook_mlp_out" in r and 0 <= r["dead_fraction"] <= 1 for r in records)
    assert not (tmp / "log_rank1.jsonl").read_text()  # opened on both ranks, written on rank 0 only


@pytest.mark.needs_hooked  # the ranks build the tiny HookedTransformer themselves
def test_rank_dying_mid_run_stops_the_others_and_keeps_the_last_checkpoint(tmp_path):
    results = run_ranks(tmp_path, ["die"])
    assert results[1] == {"exit": 3}
    error = results[0]["error"]
    assert error["type"] == "RankFailure", error
    assert "Another rank most likely stopped" in error["message"] and "step 5" in error["message"]
    ckpt = tmp_path / "ck_die"
    assert json.loads((ckpt / TRAINER_FILE).read_text())["step"] == 4
    cbinterp.load(ckpt, device="cpu")  # whole: every file matches its checksum
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no half-written checkpoint
    with pytest.warns(Warning, match="Resuming"):
        resumed = train(fresh(), batches(), config(checkpoint_dir=str(ckpt)))
    assert resumed.resumed_from == 4 and resumed.steps == 8


def test_kmeans_runs_once_and_every_rank_gets_its_codes(ranks_run):
    tmp, _ = ranks_run
    a, b = load_state(tmp / "kmeans_rank0.safetensors"), load_state(tmp / "kmeans_rank1.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    model = fresh(replace=False)
    kmeans_init_codebooks(model, kmeans_tokens(0), iters=3, progress=False)
    assert_same_state(state_of(model), a, atol=1e-5)
    other = fresh(replace=False)
    kmeans_init_codebooks(other, kmeans_tokens(1), iters=3, progress=False)
    assert not torch.equal(state_of(other)["blocks.0.hook_mlp_out.weight"], a["blocks.0.hook_mlp_out.weight"])


@pytest.mark.skipif(not tc.BRIDGE_SUPPORTED, reason=f"no TransformerBridge support on transformer-lens {tc.TL_VERSION}")
def test_a_bridge_trains_on_two_ranks_as_on_one_with_the_whole_batch(tmp_path):
    save_hf_folder("gpt2", tmp_path / "hf")
    results = run_ranks(tmp_path, ["bridge"])
    for r, res in enumerate(results):
        assert "error" not in res and "exit" not in res, (r, res)
    a, b = load_state(tmp_path / "bridge_rank0.safetensors"), load_state(tmp_path / "bridge_rank1.safetensors")
    assert a.keys() == b.keys() and any(k.endswith(".counts") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    model = fresh_bridge(tmp_path)
    one = train(model, batches(), config())
    assert_same_state(state_of(model), a, atol=1e-5)
    assert one.losses == pytest.approx(results[0]["bridge"]["losses"], abs=1e-5)
