"""Core paths of cbinterp run with every annotation checked at run time (jaxtyping's import hook with beartype).

Run by tests/test_typecheck.py in a fresh interpreter, since the hook acts on modules as they are imported: shapes
named alike in one call must agree, and every argument and return value must match its annotation. Valid input
only: the suite's tests of bad input expect cbinterp's own errors, which a checker raising first would replace.

    python tests/_typecheck_paths.py     # prints "ok" and exits 0 when every path passes its checks
"""

import sys
import tempfile
from pathlib import Path

import jaxtyping

TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS.parent), str(TESTS)]  # this checkout's cbinterp, whatever is installed
jaxtyping.install_import_hook("cbinterp", "beartype.beartype")

import torch  # noqa: E402
from tiny_models import TINY, make_model  # noqa: E402

import cbinterp  # noqa: E402
from cbinterp.core.codebooks.codes import dedupe_codes  # noqa: E402
from cbinterp.tasks.fsm import sample_from_model  # noqa: E402


def hook_is_active() -> None:
    """A wrong shape must be refused, else the checks below prove nothing."""
    try:
        dedupe_codes(torch.zeros(3, dtype=torch.long))  # annotated (n, k)
    except jaxtyping.TypeCheckError:
        return
    raise AssertionError("the jaxtyping import hook did not check cbinterp (was cbinterp imported before it?)")


def codebooks_and_interventions(tokens: torch.Tensor) -> None:
    model = make_model()
    cbinterp.attach_codebooks(model, ["attn", "mlp"], n_codes=16, k=2)
    cbinterp.kmeans_init_codebooks(model, tokens, iters=2)
    _, cache = model.run_with_cache(tokens)
    for name, cb in cbinterp.get_codebooks(model).items():
        codes = cache[f"{name}.hook_codes"]
        out = cb.decode(codes)
        assert out.shape[:-1] == codes.shape[:-1]
        cb.encode(cache[f"{name}.hook_input"])
    attn = "blocks.0.attn.hook_z"
    with cbinterp.intervene(model, cbinterp.replace_codes(model, attn, [1, 2], positions=-1, heads=0)):
        model(tokens)
    with cbinterp.intervene(model, cbinterp.ablate_codes(model, "blocks.1.hook_mlp_out", 3)):
        model(tokens)
    cbinterp.generate_with_codes(model, tokens[:1, :3], {attn: torch.tensor([[1], [2], [3], [4]])}, max_new_tokens=2)
    with cbinterp.counting_usage(model):
        model(tokens)
    cbinterp.dedupe_codes(torch.tensor([[1, 1], [2, 3]]))


def cache_and_metrics(tokens: torch.Tensor, folder: Path) -> None:
    model = make_model()
    cbinterp.attach_codebooks(model, ["attn", "mlp"], n_codes=16, k=2)
    strings = [chr(ord("a") + i) for i in range(TINY["d_vocab"])]
    for directory in (None, folder / "cache"):
        cache = cbinterp.cache_codes(
            model,
            tokens,
            batch_size=2,
            hooks=["blocks.0.mlp.hook_post"],
            directory=directory,
            progress=False,
            token_strings=strings,
        )
    name = "blocks.1.hook_mlp_out"
    cbinterp.code_frequencies(cache, name)
    cbinterp.codes_at(cache, 0, 1)
    cbinterp.top_tokens(cache, name, 0)
    cbinterp.code_contexts(cache, name, 0, max_examples=3)
    cbinterp.search_codes(cache, cache.tokens == 3)
    cbinterp.probe(cache, {"three": "^d$"}, token_strings=strings)


def training(tokens: torch.Tensor, folder: Path) -> None:
    model = make_model()
    cbinterp.attach_codebooks(model, ["mlp"], n_codes=16, k=2)
    cfg = cbinterp.TrainConfig(
        steps=2, lr=1e-3, batch_size=2, progress=False, checkpoint_every=2, checkpoint_dir=str(folder / "ckpt")
    )
    cbinterp.train(model, tokens, cfg)
    cbinterp.save(model, folder / "model")
    cbinterp.load(folder / "model")


def fsm_task() -> None:
    fsm = cbinterp.FSM.random(n_states=12, n_edges=3, seed=0)
    data = fsm.sample(4, 16, seed=0)
    fsm.feature_labels(data)
    fsm.state_plus_digit(data)
    sample_from_model(make_model(), 2, 5, bos=0)


def main() -> None:
    hook_is_active()
    tokens = torch.randint(0, TINY["d_vocab"], (4, 8), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        codebooks_and_interventions(tokens)
        cache_and_metrics(tokens, Path(tmp))
        training(tokens, Path(tmp))
        fsm_task()
    print("ok")


if __name__ == "__main__":
    main()
