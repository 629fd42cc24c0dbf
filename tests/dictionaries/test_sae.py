"""Sparse autoencoders: shapes, TopK's exact k, L1 sparsity and its tuning, save / load, seeded determinism, and SAEs
at hook names read by the code-cache tools as codes are."""

from __future__ import annotations

import json

import pytest
import torch

from cbinterp.dictionaries.sae import (
    SAEConfig,
    SparseAutoencoder,
    load_sae,
    read_sae_record,
    save_sae,
    typical_values,
)
from cbinterp.dictionaries.sae_hooks import (
    attach_saes,
    cache_latents,
    detach_saes,
    force_latent,
    get_saes,
    saes_observed,
)
from cbinterp.dictionaries.sae_train import SAETrainConfig, SAETrainer, train_sae

pytestmark = pytest.mark.usefixtures("one_thread")


def _sparse_data(step: int, groups: int = 2, dim: int = 8, n: int = 256) -> torch.Tensor:
    """Activations made of a few of 32 directions per token (seeded by `step`), offset from 0."""
    g = torch.Generator().manual_seed(step)
    directions = torch.randn(groups, 32, dim, generator=torch.Generator().manual_seed(99))
    coef = torch.rand(n, groups, 32, generator=g) * (torch.rand(n, groups, 32, generator=g) < 0.1)
    return torch.einsum("ngf,gfd->ngd", coef, directions) + 1.0


def _topk(**kw) -> SparseAutoencoder:
    return SparseAutoencoder(SAEConfig(**{"d_in": 8, "n_latents": 64, "groups": 2, "k": 4, **kw}))


def _l1(**kw) -> SparseAutoencoder:
    cfg = {"d_in": 8, "n_latents": 64, "groups": 2, "architecture": "l1", "k": None, "n_ids": 16, **kw}
    return SparseAutoencoder(SAEConfig(**cfg))


# -- the model ------------------------------------------------------------------------------------------------
def test_shapes_grouped_and_ungrouped():
    sae = _topk()
    x = torch.randn(3, 5, 2, 8)
    assert sae.encode(x).shape == (3, 5, 2, 64)
    assert sae(x).shape == x.shape
    assert sae.active_ids(sae.encode(x)).shape == (3, 5, 2, 4)
    one = SparseAutoencoder(SAEConfig(d_in=8, n_latents=64, groups=1, k=4))
    y = torch.randn(3, 5, 8)
    assert one.encode(y).shape == (3, 5, 64) and one(y).shape == y.shape
    assert one.active_ids(one.encode(y)).shape == (3, 5, 4)
    with pytest.raises(ValueError, match=r"\(\.\.\., 2, 8\)"):
        sae(torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"\(\.\.\., 8\)"):
        one(torch.randn(3, 7))


def test_topk_has_exactly_k_active_latents():
    sae = _topk()
    with torch.no_grad():
        sae.b_enc.fill_(100.0)  # every pre-activation positive: the top k are all active, the rest are zeroed
    latents = sae.encode(torch.randn(50, 2, 8))
    assert torch.equal((latents > 0).sum(-1), torch.full((50, 2), 4))
    ids = sae.active_ids(latents)
    assert bool((ids >= 0).all())
    assert torch.equal(latents.gather(-1, ids), latents.topk(4, dim=-1).values)  # most active first
    with torch.no_grad():
        sae.b_enc.fill_(-100.0)  # nothing active: ReLU of the top k is 0, and no id is listed
    assert int((sae.encode(torch.randn(50, 2, 8)) > 0).sum()) == 0
    assert bool((sae.active_ids(sae.encode(torch.randn(50, 2, 8))) == -1).all())


def test_sparse_decoding_matches_dense():
    sae = _topk()
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.input_scale.fill_(2.0)
    x = torch.randn(10, 2, 8)
    values, ids = sae.encode(x).topk(4, dim=-1)
    torch.testing.assert_close(sae.decode_sparse(values, ids), sae.decode(sae.encode(x)))


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="k=None"):
        SAEConfig(d_in=8, n_latents=64, architecture="l1", k=4)
    with pytest.raises(ValueError, match="int k in"):
        SAEConfig(d_in=8, n_latents=64, k=65)
    with pytest.raises(ValueError, match="architecture must be one of"):
        SAEConfig(d_in=8, n_latents=64, architecture="jumprelu")
    with pytest.raises(ValueError, match="n_latents must be an int >= 1"):
        SAEConfig(d_in=8, n_latents=True)
    assert SAEConfig(d_in=8, n_latents=100, architecture="l1", k=None).ids_per_token == 64


def test_typical_values_are_each_latents_median_when_active():
    sae = _topk()
    x = torch.randn(300, 2, 8)
    typical = typical_values(sae, x, chunk_tokens=64)
    latents = sae.encode(x)
    for group, latent in [(0, 0), (1, 5), (1, 63)]:
        on = latents[:, group, latent][latents[:, group, latent] > 0]
        want = on.sort().values[(len(on) - 1) // 2] if len(on) else torch.tensor(0.0)
        assert typical[group, latent] == want
    with torch.no_grad():
        sae.b_enc[0, 3] = -1e4  # never active: 0
    assert typical_values(sae, x)[0, 3] == 0.0


# -- training -----------------------------------------------------------------------------------------------------
def test_topk_training_lowers_the_error_and_keeps_k():
    sae = _topk()
    trainer = train_sae(sae, _sparse_data, SAETrainConfig(steps=60, lr=3e-3))
    first, last = trainer.history[0], trainer.history[-1]
    assert sum(last["fvu"]) < 0.6 * sum(first["fvu"])
    assert all(l0 <= 4 for r in trainer.history for l0 in r["l0"])
    norms = sae.W_dec.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_l1_penalty_makes_latents_sparser():
    l0 = {}
    for coefficient in (0.01, 3.0):
        sae = _l1()
        train_sae(sae, _sparse_data, SAETrainConfig(steps=60, lr=3e-3, l1_coefficient=coefficient))
        l0[coefficient] = float((sae.encode(_sparse_data(1000)) > 0).sum(-1).float().mean())
    assert l0[3.0] < 0.5 * l0[0.01]


def test_l1_tuning_moves_each_group_towards_the_target_l0():
    sae = _l1()
    cfg = SAETrainConfig(steps=150, lr=3e-3, l1_coefficient=0.1, target_l0=3.0, tune_fraction=1.0, tune_rate=0.03)
    trainer = train_sae(sae, _sparse_data, cfg)
    first = trainer.history[0]["l0"]
    reached = (sae.encode(_sparse_data(1000)) > 0).sum(-1).float().mean(0)
    assert all(f > 10 for f in first)
    assert bool(((reached > 1.5) & (reached < 6)).all()), reached
    assert bool((trainer.l1 > 1.0).all())  # raised from its start, group by group
    frozen = SAETrainer(_l1(), SAETrainConfig(steps=10, target_l0=3.0, tune_fraction=0.0))
    frozen.step(_sparse_data(0))
    assert frozen.l1.tolist() == [1.0, 1.0]


def test_training_is_repeatable_and_seeded():
    a, b, c = _topk(seed=3), _topk(seed=3), _topk(seed=4)
    assert torch.equal(a.W_enc, b.W_enc) and not torch.equal(a.W_enc, c.W_enc)
    cfg = SAETrainConfig(steps=5)
    train_sae(a, _sparse_data, cfg)
    train_sae(b, _sparse_data, cfg)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_auxk_loss_gives_dead_latents_a_gradient():
    sae = _topk()
    with torch.no_grad():
        sae.b_enc[:, 32:] = 100.0  # the other half always wins the top k: these are dead after dead_steps
    trainer = SAETrainer(sae, SAETrainConfig(steps=20, dead_steps=2))
    for step in range(3):
        record = trainer.step(_sparse_data(step))
        assert record["aux"] == 0.0 if step < 2 else record["aux"] > 0
    assert record["n_dead"] >= 2 * 32
    before = sae.W_enc[..., :32].clone()
    trainer.step(_sparse_data(3))
    assert not torch.equal(sae.W_enc[..., :32], before)  # only the AuxK loss reaches them
    silent = _topk()
    with torch.no_grad():
        silent.b_enc[:, 32:] = 100.0
    start = silent.W_enc[..., :32].clone()
    trainer = SAETrainer(silent, SAETrainConfig(steps=20, dead_steps=2, aux_coefficient=0.0))
    for step in range(4):
        trainer.step(_sparse_data(step))
    assert torch.equal(silent.W_enc[..., :32], start)


# -- save / load ----------------------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    sae = _l1(seed=5)
    train_sae(sae, _sparse_data, SAETrainConfig(steps=3))
    path = save_sae(sae, tmp_path / "sae", extra={"site": "blocks.0.attn.hook_z", "l1": [0.5, 0.7]})
    loaded = load_sae(path)
    assert loaded.cfg == sae.cfg
    for (name, p), q in zip(sae.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(p, q), name
    x = torch.randn(4, 2, 8)
    assert torch.equal(loaded(x), sae(x))
    assert read_sae_record(path)["extra"] == {"site": "blocks.0.attn.hook_z", "l1": [0.5, 0.7]}
    save_sae(_topk(), path)  # a saved SAE may be replaced by another
    assert load_sae(path).cfg.architecture == "topk"


def test_save_refuses_to_replace_other_data_and_load_names_damage(tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="Save to another folder"):
        save_sae(_topk(), other)
    assert (other / "notes.txt").read_text() == "keep me"
    path = save_sae(_topk(), tmp_path / "sae")
    record = json.loads((path / "sae.json").read_text())
    record["config"]["n_latents"] = 32
    (path / "sae.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="do not fit its config"):
        load_sae(path)
    (path / "sae.json").write_text("{not json")
    with pytest.raises(ValueError, match="Damaged SAE config"):
        load_sae(path)
    with pytest.raises(FileNotFoundError, match="no sae.json"):
        load_sae(tmp_path)


# -- at hook names ----------------------------------------------------------------------------------------------
def _hook_z_saes(model, kind="topk"):
    heads, d_head = model.cfg.n_heads, model.cfg.d_head
    make = dict(d_in=d_head, n_latents=16, groups=heads)
    make |= {"k": 2} if kind == "topk" else {"architecture": "l1", "k": None, "n_ids": 4}
    return {f"blocks.{layer}.attn.hook_z": SparseAutoencoder(SAEConfig(**make, seed=layer)) for layer in range(2)}


def test_attached_saes_show_their_latents_and_splice_or_observe(model, tokens):
    clean = model(tokens)
    saes = _hook_z_saes(model)
    attach_saes(model, saes)
    assert list(get_saes(model)) == list(saes)
    logits, cache = model.run_with_cache(tokens)
    site = "blocks.0.attn.hook_z"
    assert cache[f"{site}.hook_latents"].shape == (*tokens.shape, 4, 16)
    ids = cache[f"{site}.hook_codes"]
    assert ids.shape == (*tokens.shape, 4, 2)
    assert torch.equal(ids, saes[site].active_ids(saes[site].encode(cache[f"{site}.hook_input"])))
    assert torch.equal(cache[site], cache[f"{site}.hook_recon"])  # spliced: the reconstruction goes on
    assert not torch.allclose(logits, clean)
    with saes_observed(model):
        torch.testing.assert_close(model(tokens), clean)  # the error term added back: the model's own outputs
    detach_saes(model)
    assert get_saes(model) == {}
    torch.testing.assert_close(model(tokens), clean)


def test_attach_refuses_a_site_of_another_shape(model):
    wrong = SparseAutoencoder(SAEConfig(d_in=model.cfg.d_head + 1, n_latents=16, groups=model.cfg.n_heads, k=2))
    with pytest.raises(ValueError, match="attach it at the site it was trained on"):
        attach_saes(model, {"blocks.0.attn.hook_z": wrong})
    assert get_saes(model) == {}


def test_force_latent_sets_its_value_in_one_head(model, tokens):
    saes = _hook_z_saes(model)
    attach_saes(model, saes)
    site = "blocks.1.attn.hook_z"
    hook = force_latent(site, 7, 2.5, head=1)
    with model.hooks(fwd_hooks=[hook]):
        _, cache = model.run_with_cache(tokens)
    latents = cache[f"{site}.hook_latents"]
    assert bool((latents[..., 1, 7] == 2.5).all())
    with pytest.raises(ValueError, match="head"):
        force_latent(site, 7, 2.5, head=-2)


def test_force_latent_last_only_leaves_earlier_positions(model, tokens):
    saes = _hook_z_saes(model)
    attach_saes(model, saes)
    site = "blocks.1.attn.hook_z"
    _, clean = model.run_with_cache(tokens)
    with model.hooks(fwd_hooks=[force_latent(site, 7, 2.5, head=1, last_only=True)]):
        _, cache = model.run_with_cache(tokens)
    latents, before = cache[f"{site}.hook_latents"], clean[f"{site}.hook_latents"]
    assert bool((latents[:, -1, 1, 7] == 2.5).all())
    torch.testing.assert_close(latents[:, :-1], before[:, :-1])
    torch.testing.assert_close(latents[:, -1, 0], before[:, -1, 0])  # other heads untouched


@pytest.mark.parametrize("kind", ["topk", "l1"])
def test_cache_latents_holds_the_active_ids_as_codes(model, kind):
    from cbinterp.metrics.heldout import probe_heldout
    from cbinterp.tasks.packing import DocumentTokens

    saes = _hook_z_saes(model, kind)
    attach_saes(model, saes)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.cfg.d_vocab, (4, 12), generator=g)
    tokens[:, 0] = 0  # BOS stand-in, dropped from the cache as cache_documents drops it
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[3, 9:] = False  # padding
    docs = DocumentTokens(tokens=tokens, mask=mask, doc_index=torch.tensor([0, 0, 1, 2]))
    hooks = ["blocks.0.mlp.hook_post", "blocks.0.attn.hook_z.hook_input"]
    cache = cache_latents(model, docs, hooks=hooks)
    assert cache.codebook_names == list(saes) and cache.hook_names == hooks
    keep = mask.clone()
    keep[:, 0] = False
    assert cache.n_tokens == int(keep.sum()) and cache.n_docs == 3
    assert torch.equal(cache.tokens, tokens[keep])
    site = "blocks.1.attn.hook_z"
    with saes_observed(model):
        _, run = model.run_with_cache(tokens)
    assert torch.equal(cache.codes(site), run[f"{site}.hook_codes"][keep])
    assert cache.n_codes(site) == 16
    table = probe_heldout(cache, cache, {"any": r"."}, [str(i) for i in range(model.cfg.d_vocab)], neurons=False)
    assert len(table) == 1 and table["code"].iloc[0] >= 0  # the probe reads latents as it reads codes


def test_cache_latents_refuses_a_model_without_saes_or_with_codebooks(model, cb_model):
    from cbinterp.tasks.packing import DocumentTokens

    docs = DocumentTokens(
        tokens=torch.zeros(1, 4, dtype=torch.long), mask=torch.ones(1, 4, dtype=torch.bool), doc_index=torch.zeros(1)
    )
    with pytest.raises(ValueError, match="attach_saes"):
        cache_latents(model, docs)
    resid = SparseAutoencoder(SAEConfig(d_in=cb_model.cfg.d_model, n_latents=16, k=2))
    attach_saes(cb_model, {"blocks.0.hook_resid_post": resid})
    with pytest.raises(ValueError, match="has codebooks"):
        cache_latents(cb_model, docs)
