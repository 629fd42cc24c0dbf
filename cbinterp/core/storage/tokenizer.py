"""A model's tokenizer, offline: attach one to a config-built HookedTransformer, save and load it as plain files.

Nothing here touches the Hugging Face Hub: tokenizers load from local folders only. `cbinterp.save` writes an
attached tokenizer beside the weights and `cbinterp.load` attaches it again.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from pathlib import Path

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from cbinterp.core.codebooks.attach import require_hooked_transformer
from cbinterp.core.storage.atomic import atomic_dir, atomic_file
from cbinterp.core.tl_compat import Model

__all__ = ["attach_tokenizer", "load_tokenizer", "save_tokenizer", "tokenizer_fingerprint", "write_tokenizer_files"]


#: What ``save_pretrained`` writes for a tokenizer: a folder holding only these may be replaced by `save_tokenizer`.
TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "chat_template.jinja",
        "chat_template.json",
        "tokenizer.model",
    }
)


def _check_tokenizer_replaceable(path: Path) -> None:
    """Raise FileExistsError unless `path` is absent, an empty folder, or a tokenizer folder.

    A tokenizer folder holds only the files ``save_pretrained`` writes; replacing anything else would delete the
    user's files."""
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        raise FileExistsError(
            f"Refusing to write the tokenizer to {path}: a file is there, not a folder. Choose another path."
        )
    foreign = sorted(p.name for p in path.iterdir() if p.name not in TOKENIZER_FILES or not p.is_file())
    if foreign:
        raise FileExistsError(
            f"Refusing to replace {path}: it holds files that are not a tokenizer's ({foreign[:5]}), which replacing "
            "it would delete. Move them away, or choose another path."
        )


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, directory: str | os.PathLike) -> Path:
    """Write `tokenizer` with ``save_pretrained`` into `directory`, atomically (the old folder stays on failure).

    Only an empty folder or a previous tokenizer folder is replaced; anything else is refused with FileExistsError.
    """
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(f"save_tokenizer needs a transformers tokenizer, got {type(tokenizer).__name__}.")
    path = Path(directory).expanduser().resolve()
    with atomic_dir(path, check=_check_tokenizer_replaceable) as tmp:
        tokenizer.save_pretrained(str(tmp))
    return path


def load_tokenizer(directory: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by `save_tokenizer` (or any local ``tokenizer.json`` folder); never calls the Hub."""
    path = Path(directory).expanduser().resolve()  # an absolute name: TransformerLens reloads from it
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"No tokenizer at {path}: expected {path / 'tokenizer.json'}, as written by save_tokenizer(tok, "
            f"directory) or train_bpe_tokenizer(..., directory=...)."
        )
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    if tokenizer.bos_token_id is None:
        raise ValueError(f"The tokenizer at {path} has no BOS token; cbinterp starts every row with one.")
    return tokenizer


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of what maps text to ids and back (vocabulary, merges, special tokens, pre-tokenizer, decoder)."""
    state = json.loads(_backend(tokenizer).to_str())
    # padding, truncation and post-processor are call-time settings (attach_tokenizer and to_tokens change them)
    kept = {key: state.get(key) for key in ("added_tokens", "normalizer", "pre_tokenizer", "model", "decoder")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _backend(tokenizer: PreTrainedTokenizerBase):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"cbinterp needs a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}.")
    return backend


def content_name(tokenizer: PreTrainedTokenizerBase) -> str:
    """`cbinterp-tokenizer:<sha256 prefix>`: a name that identifies the tokenizer by its content."""
    # The ':' makes it an invalid Hub repo id, so nothing can mistake it for one and try to download it.
    return f"cbinterp-tokenizer:{tokenizer_fingerprint(tokenizer)[:16]}"


def set_tokenizer_name(tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    """Rename `tokenizer` where TransformerLens reads the name."""
    tokenizer.name_or_path = name
    tokenizer.init_kwargs["name_or_path"] = name  # TransformerLens reads this copy, not the attribute


def _vocab_extent(tokenizer: PreTrainedTokenizerBase) -> int:
    """One more than the largest token id the tokenizer can produce."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)


def attach_tokenizer(model: Model, tokenizer: PreTrainedTokenizerBase) -> Model:
    """Give `model` (built from a config, without a tokenizer) `tokenizer`, offline; returns `model`.

    Afterwards ``model.to_tokens``, ``to_string``, ``to_str_tokens`` and ``generate`` work, and
    ``to_tokens(text)`` starts with BOS (``prepend_bos=False`` leaves it out). The model keeps a copy that adds
    BOS itself; `tokenizer` is not changed. TransformerLens would re-create the tokenizer from its name (a
    local path or a Hub id); the copy is handed over already BOS-adding, which TransformerLens keeps as is, so
    no file or download is needed. The copy is named by its content (``cbinterp-tokenizer:<sha256 prefix>``),
    which is what `cache_codes` records to tell tokenizers apart.
    """
    require_hooked_transformer(model)
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(f"attach_tokenizer needs a transformers tokenizer, got {type(tokenizer).__name__}.")
    _backend(tokenizer)
    if tokenizer.bos_token_id is None:
        raise ValueError("The tokenizer has no BOS token; set one (e.g. tokenizer.bos_token = '<|endoftext|>').")
    n_ids = _vocab_extent(tokenizer)
    for field in ("d_vocab", "d_vocab_out"):
        size = getattr(model.cfg, field)
        if size < n_ids:
            raise ValueError(
                f"The tokenizer has {n_ids} token ids but the model's cfg.{field} is {size}: larger ids would "
                f"index past the {'embedding' if field == 'd_vocab' else 'unembedding'}. Build the model with "
                f"d_vocab={n_ids} (len(tokenizer)), or train a tokenizer with vocab_size <= {size}."
            )
    own = copy.deepcopy(tokenizer)
    own.add_bos_token = True  # rebuilds the post-processor, so own(text) starts with BOS
    own.init_kwargs["add_bos_token"] = True  # what TransformerLens checks before re-creating a tokenizer
    set_tokenizer_name(own, content_name(tokenizer))
    model.set_tokenizer(own, default_padding_side="right")
    if model.tokenizer is not own or not model.cfg.tokenizer_prepends_bos:
        raise RuntimeError("TransformerLens replaced the tokenizer; this transformer-lens version is unsupported.")
    return model


def write_tokenizer_files(tokenizer: PreTrainedTokenizerBase, directory: Path) -> list[str]:
    """Write the tokenizer's files (``save_pretrained``) into an existing folder beside other files, each atomically.

    Returns their names, for the folder's manifest."""
    with tempfile.TemporaryDirectory(prefix="cbinterp-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        names = sorted(os.listdir(tmp))
        for name in names:
            with atomic_file(Path(directory) / name) as target:
                target.write_bytes((Path(tmp) / name).read_bytes())
    return names
