"""`from_codebook_features`: folders saved by the authors' `codebook-features` 0.1.2 give their codes and logits.

The fixtures in tests/fixtures/codebook_features/ were written by that library itself
(benchmarks/reference/make_codebook_features_fixtures.py, run in its own old-stack environment): tiny GPT-2, GPT-NeoX
and GPT-Neo codebook models, with the token ids fed, the logits and the code ids their code computed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cbinterp
from cbinterp.core.codebooks.attach import get_codebooks
from cbinterp.models.codebook_features import PLACEMENT_HOOKS, from_codebook_features

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "codebook_features"
NAMES = ["gpt2-preproj", "gpt2-blocks", "neox-preproj", "neox-blocks", "neo-preproj", "neo-blocks"]


def convert(name: str, folder: Path | None = None, **kwargs):
    base = FIXTURES / f"base-{name.split('-')[0]}"
    return from_codebook_features(folder or FIXTURES / name, base, device="cpu", **kwargs)


def expected(name: str) -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "expected" / f"{name}.safetensors")


def run(model, tokens):
    """Logits, and the codes of every codebook by `codes.<layer>.<placement>` as the fixtures name them."""
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(".hook_codes"))
    codes = {}
    for placement, template in PLACEMENT_HOOKS.items():
        for layer in range(model.cfg.n_layers):
            name = template.format(layer=layer) + ".hook_codes"
            if name in cache:
                codes[f"codes.{layer}.{placement}"] = cache[name]
    return logits, codes


def copy_with_config(tmp_path: Path, name: str, **changes) -> Path:
    """A copy of a fixture folder with its codebook config changed."""
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.needs_hooked
def test_same_codes_and_logits_as_the_authors_code(name, no_network):
    model = convert(name)
    want = expected(name)
    logits, codes = run(model, want["tokens"])
    assert sorted(codes) == sorted(k for k in want if k.startswith("codes."))
    for key, ids in codes.items():
        assert torch.equal(ids, want[key]), key
    assert (logits - want["logits"]).abs().max().item() <= 1e-5


@pytest.mark.needs_hooked
def test_placements_sit_at_their_hooks():
    preproj = get_codebooks(convert("neox-preproj"))
    assert list(preproj) == [
        "blocks.0.attn.hook_z",
        "blocks.0.hook_mlp_out",
        "blocks.1.attn.hook_z",
        "blocks.1.hook_mlp_out",
    ]
    heads = preproj["blocks.0.attn.hook_z"].cfg
    assert (heads.groups, heads.dim, heads.n_codes, heads.k) == (4, 4, 12, 2)
    assert (heads.similarity, heads.normalize_input, heads.norm_affine, heads.combine) == (
        "inner_product",
        True,
        True,
        "mean",
    )
    blocks = get_codebooks(convert("gpt2-blocks"))
    assert {name: cb.k for name, cb in blocks.items()} == {
        "blocks.1.hook_attn_out": 1,
        "blocks.1.mlp.hook_post": 3,
        "blocks.1.hook_resid_post": 2,
    }
    assert {cb.cfg.similarity for cb in blocks.values()} == {"euclidean"}


@pytest.mark.needs_hooked
def test_the_fixtures_need_the_affine_norm_and_the_mean():
    """Without the trained scale and bias, or with the k codes summed, the model is not the authors' one."""
    want = expected("neox-preproj")
    model = convert("neox-preproj")
    heads = model.blocks[0].attn.hook_z
    heads.cfg.combine = "sum"
    logits, _ = run(model, want["tokens"])
    assert (logits - want["logits"]).abs().max().item() > 1e-2
    heads.cfg.combine = "mean"
    with torch.no_grad():
        heads.norm_weight.fill_(1.0)
        heads.norm_bias.zero_()
    _, codes = run(model, want["tokens"])
    assert not torch.equal(codes["codes.0.attn_preproj"], want["codes.0.attn_preproj"])


@pytest.mark.needs_hooked
def test_the_options_reach_the_base_models_conversion():
    """device, dtype, n_ctx, default_prepend_bos and check are `from_hf`'s, each passed on as itself."""
    model = convert("neox-preproj", dtype=torch.float64, n_ctx=16, default_prepend_bos=True, check=False)
    assert (model.cfg.dtype, model.cfg.n_ctx, model.cfg.default_prepend_bos) == (torch.float64, 16, True)
    assert model.cfg.device in ("cpu", torch.device("cpu"))
    assert next(model.parameters()).dtype == torch.float64


@pytest.mark.needs_hooked
def test_round_trip_through_cbinterp_save_and_load(tmp_path):
    model = convert("neo-preproj")
    cbinterp.save(model, tmp_path / "saved")
    again = cbinterp.load(tmp_path / "saved", device="cpu")
    assert {n: cb.cfg for n, cb in get_codebooks(again).items()} == {
        n: cb.cfg for n, cb in get_codebooks(model).items()
    }
    want = expected("neo-preproj")
    logits, codes = run(again, want["tokens"])
    assert all(torch.equal(ids, want[key]) for key, ids in codes.items())
    assert (logits - want["logits"]).abs().max().item() <= 1e-5


def lay_out_as_hub_cache(cache: Path, repo_id: str, files: Path) -> None:
    """`files` (a folder) as the Hugging Face cache holds a download of `repo_id`: blobs named by their hash,
    a snapshot folder of links to them, and refs/main naming the snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in sorted(files.iterdir()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / file.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


@pytest.mark.needs_hooked
def test_released_model_by_hub_name_offline(tmp_path, no_network):
    """The documented path: `snapshot_download` the codebook model and its base, then convert; here from a cache."""
    from huggingface_hub import snapshot_download

    cache = tmp_path / "hub"
    lay_out_as_hub_cache(cache, "someone/tiny-neox-codebook", FIXTURES / "neox-blocks")
    lay_out_as_hub_cache(cache, "someone/tiny-neox", FIXTURES / "base-neox")
    folder = snapshot_download("someone/tiny-neox-codebook", cache_dir=cache, local_files_only=True)
    base = snapshot_download("someone/tiny-neox", cache_dir=cache, local_files_only=True)
    model = from_codebook_features(folder, base, device="cpu")
    assert model.cfg.model_name == "tiny-neox-codebook"
    want = expected("neox-blocks")
    logits, codes = run(model, want["tokens"])
    assert all(torch.equal(ids, want[key]) for key, ids in codes.items())
    assert (logits - want["logits"]).abs().max().item() <= 1e-5


def test_hub_name_not_downloaded():
    with pytest.raises(FileNotFoundError, match=r"snapshot_download\('taufeeque/some-model'\)"):
        from_codebook_features("taufeeque/some-model", FIXTURES / "base-gpt2")


@pytest.mark.needs_hooked
def test_other_folders_refused(tmp_path):
    model = convert("gpt2-preproj")
    cbinterp.save(model, tmp_path / "ours")
    with pytest.raises(ValueError, match="not a codebook-features codebook model.*cbinterp.load"):
        from_codebook_features(tmp_path / "ours", FIXTURES / "base-gpt2")
    with pytest.raises(ValueError, match="not a codebook-features codebook model.*from_hf"):
        from_codebook_features(FIXTURES / "base-gpt2", FIXTURES / "base-gpt2")
    with pytest.raises(ValueError, match="base model is a 'gpt2' model.*'gpt_neox'"):
        from_codebook_features(FIXTURES / "neox-blocks", FIXTURES / "base-gpt2")


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(codebook_at=["qkv", "mlp"]), "'qkv' quantizes the fused query-key-value.*no TransformerLens hook"),
        (dict(codebook_at=["attn_plus_mlp", "mlp"]), "'attn_plus_mlp'.*no TransformerLens hook"),
        (dict(codebook_type=["vanilla", "vanilla"], num_codebooks=[1, 1]), "only a grouped codebook with one"),
        (dict(codebook_at=["mlp", "attn_preproj"]), "only vanilla codebooks convert"),
        (dict(similarity_metric="cosine"), "Unknown similarity_metric 'cosine'"),
    ],
)
def test_what_cannot_be_reproduced_is_refused(tmp_path, changes, match):
    with pytest.raises(ValueError, match=match):
        convert("gpt2-preproj", copy_with_config(tmp_path, "gpt2-preproj", **changes))


def test_codebook_never_run_by_their_library_is_refused(tmp_path):
    folder = copy_with_config(tmp_path, "neox-blocks", codebook_at=["transformer_block", "attn", "mlp_mid"])
    with pytest.raises(ValueError, match="'transformer_block' before 'attn'.*never runs"):
        convert("neox-blocks", folder)
