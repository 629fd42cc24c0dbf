"""Sparse autoencoders (TopK and L1), one independent dictionary per group (per attention head at `hook_z`).

An SAE maps an activation x (`d_in`) to `n_latents` non-negative latents and back:

    latents = act((x / scale - b_dec) @ W_enc + b_enc)        recon = (latents @ W_dec + b_dec) * scale

with `act` = ReLU for "l1" (sparsity from an L1 penalty in training) and, for "topk", ReLU of the k largest
pre-activations with every other latent 0 (Gao et al. 2024), so exactly at most k latents are active per token.
`scale` is a fixed per-group number set from data before training (`init_from_data_`) so that the scaled input has
mean squared norm `d_in`, as SAELens normalises activations; it is a buffer, saved with the weights. Decoder rows are
kept at unit norm in training. With `groups > 1` the input is `(..., groups, d_in)` and each group has its own
weights (like a per-head `Codebook`); with `groups == 1` it is `(..., d_in)`.

`active_ids` turns latents into the ids a codebook's `hook_codes` holds: the `n_ids` most active latents of each
token (per group), most active first, -1 where fewer are active. `save_sae` / `load_sae` write and read a folder of
`sae.json` (the config, and whatever the trainer records) beside `sae.safetensors`, atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from cbinterp.core.checks import is_int
from cbinterp.core.storage.atomic import atomic_dir, readable_dir, recover_dir, user_path

__all__ = [
    "ARCHITECTURES",
    "SAE_FORMAT",
    "SAEConfig",
    "SparseAutoencoder",
    "load_sae",
    "read_sae_record",
    "save_sae",
    "typical_values",
]

ARCHITECTURES = ("topk", "l1")
SAE_FORMAT = "cbinterp-sae"
SAE_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE = "sae.json", "sae.safetensors"
#: Latent ids an L1 SAE lists per token by default (its active count varies; TopK lists its k).
L1_DEFAULT_IDS = 64


@dataclasses.dataclass(frozen=True)
class SAEConfig:
    """Settings of a `SparseAutoencoder`.

    Args:
        d_in: size of one group's input (a head's d_head at `hook_z`).
        n_latents: latents per group.
        groups: independent dictionaries side by side (the number of heads at `hook_z`; 1 elsewhere).
        architecture: "topk" (k active latents per token) or "l1" (ReLU; sparsity comes from training).
        k: active latents per token and group, for "topk" only (None for "l1").
        n_ids: latent ids listed per token by `active_ids` / `hook_codes` (default: k for "topk", 64 for "l1").
        seed: seeds the initial weights.
    """

    d_in: int
    n_latents: int
    groups: int = 1
    architecture: str = "topk"
    k: int | None = 8
    n_ids: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("d_in", "n_latents", "groups"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"SAEConfig.{name} must be an int >= 1, got {value!r}.")
        if not is_int(self.seed) or self.seed < 0:
            raise ValueError(f"SAEConfig.seed must be an int >= 0, got {self.seed!r}.")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"SAEConfig.architecture must be one of {ARCHITECTURES}, got {self.architecture!r}.")
        if self.architecture == "topk":
            if not is_int(self.k) or not 1 <= self.k <= self.n_latents:
                raise ValueError(f"A TopK SAE needs an int k in [1, n_latents={self.n_latents}], got k={self.k!r}.")
        elif self.k is not None:
            raise ValueError(
                f"An L1 SAE has no k (its sparsity comes from the L1 penalty), got k={self.k!r}; pass k=None, and "
                "n_ids for how many latent ids a token lists."
            )
        if self.n_ids is not None and (not is_int(self.n_ids) or not 1 <= self.n_ids <= self.n_latents):
            raise ValueError(f"SAEConfig.n_ids must be None or an int in [1, {self.n_latents}], got {self.n_ids!r}.")

    @property
    def ids_per_token(self) -> int:
        """How many latent ids `active_ids` lists per token (and group)."""
        if self.n_ids is not None:
            return self.n_ids
        return self.k if self.architecture == "topk" else min(L1_DEFAULT_IDS, self.n_latents)


class SparseAutoencoder(nn.Module):
    """A TopK or L1 sparse autoencoder with `cfg.groups` independent dictionaries (see the module docstring)."""

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(cfg, SAEConfig):
            raise TypeError(f"SparseAutoencoder takes an SAEConfig, got {type(cfg).__name__}.")
        self.cfg = cfg
        g, d, n = cfg.groups, cfg.d_in, cfg.n_latents
        generator = torch.Generator().manual_seed(cfg.seed)
        w_dec = torch.randn(g, n, d, generator=generator)
        w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True)
        kw = dict(device=device, dtype=dtype)
        self.W_dec = nn.Parameter(w_dec.to(**kw))
        # the encoder starts as the decoder's transpose (Gao et al. 2024; SAELens' default), a tenth of it for L1
        # (SAELens' decoder norm 0.1), where about half of all latents are active at first and would sum to tens of x
        w_enc = w_dec.transpose(1, 2).contiguous() * (1.0 if cfg.architecture == "topk" else 0.1)
        self.W_enc = nn.Parameter(w_enc.to(**kw))
        self.b_enc = nn.Parameter(torch.zeros(g, n, **kw))
        self.b_dec = nn.Parameter(torch.zeros(g, d, **kw))
        self.register_buffer("input_scale", torch.ones(g, **kw))

    # -- shapes ------------------------------------------------------------------------------------------------
    def _grouped(self, x: Tensor) -> Tensor:
        """`x` as `(..., groups, d_in)`, checked."""
        cfg = self.cfg
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"The SAE's input must be a float tensor, got {getattr(x, 'dtype', type(x).__name__)}.")
        want = f"(..., {cfg.groups}, {cfg.d_in})" if cfg.groups > 1 else f"(..., {cfg.d_in})"
        if cfg.groups > 1:
            if x.dim() < 2 or tuple(x.shape[-2:]) != (cfg.groups, cfg.d_in):
                raise ValueError(f"The SAE takes activations of shape {want}, got {tuple(x.shape)}.")
            return x
        if x.dim() < 1 or x.shape[-1] != cfg.d_in:
            raise ValueError(f"The SAE takes activations of shape {want}, got {tuple(x.shape)}.")
        return x.unsqueeze(-2)

    def _ungrouped(self, y: Tensor) -> Tensor:
        return y if self.cfg.groups > 1 else y.squeeze(-2)

    # -- encode / decode ---------------------------------------------------------------------------------------
    def pre_activations(self, x: Float[Tensor, "... dim"]) -> Float[Tensor, "... n_latents"]:
        """The latents before the activation function, `(..., [groups,] n_latents)`."""
        xg = self._grouped(x)
        scaled = xg / self.input_scale[:, None] - self.b_dec
        pre = torch.einsum("...gd,gdn->...gn", scaled, self.W_enc) + self.b_enc
        return self._ungrouped(pre)

    def encode(self, x: Float[Tensor, "... dim"]) -> Float[Tensor, "... n_latents"]:
        """Latents `(..., [groups,] n_latents)`: ReLU ("l1"), or ReLU of the top k and 0 elsewhere ("topk")."""
        pre = self.pre_activations(x)
        if self.cfg.architecture == "l1":
            return torch.relu(pre)
        values, ids = pre.topk(self.cfg.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, ids, torch.relu(values))

    def decode(self, latents: Float[Tensor, "... n_latents"]) -> Float[Tensor, "... dim"]:
        """The reconstruction `(..., [groups,] d_in)` of dense latents."""
        lg = latents if self.cfg.groups > 1 else latents.unsqueeze(-2)
        out = torch.einsum("...gn,gnd->...gd", lg, self.W_dec) + self.b_dec
        return self._ungrouped(out * self.input_scale[:, None])

    def decode_sparse(
        self, values: Float[Tensor, "... n"], ids: Int[Tensor, "... n"], bias: bool = True
    ) -> Float[Tensor, "... dim"]:
        """The reconstruction from a few latents per token: `values` at latent `ids` (`(..., [groups,] n)`).

        Cheaper than `decode` for TopK latents. Without `bias`, no `b_dec` (and no input scale): the scaled sum of
        the latents' decoder rows alone."""
        vg, ig = (values, ids) if self.cfg.groups > 1 else (values.unsqueeze(-2), ids.unsqueeze(-2))
        lead = vg.shape[:-2]
        g, n = self.cfg.groups, vg.shape[-1]
        out = self.sparse_sum(vg.reshape(-1, g, n), ig.reshape(-1, g, n)).reshape(*lead, g, self.cfg.d_in)
        if bias:
            out = (out + self.b_dec) * self.input_scale[:, None]
        return self._ungrouped(out)

    def sparse_sum(
        self, values: Float[Tensor, "n groups _k"], ids: Int[Tensor, "n groups _k"]
    ) -> Float[Tensor, "n groups dim"]:
        """The sum of the decoder rows `ids` weighted by `values`, per group (scaled units, no bias); id -1 adds 0."""
        g = self.cfg.groups
        rows = self.W_dec[torch.arange(g, device=ids.device)[None, :, None], ids.clamp_min(0)]  # (m, g, n, d)
        return torch.einsum("mgn,mgnd->mgd", values * (ids >= 0), rows)

    def forward(self, x: Float[Tensor, "... dim"]) -> Float[Tensor, "... dim"]:
        """The reconstruction of `x`."""
        return self.decode(self.encode(x))

    def active_ids(self, latents: Float[Tensor, "... n_latents"], n: int | None = None) -> Int[Tensor, "... n"]:
        """The `n` (default `cfg.ids_per_token`) most active latent ids per token, most active first.

        -1 past the active ones (a latent of value 0 is not active): a codebook's code ids, `(..., [groups,] n)`."""
        n = self.cfg.ids_per_token if n is None else n
        if not is_int(n) or not 1 <= n <= self.cfg.n_latents:
            raise ValueError(f"n must be an int in [1, {self.cfg.n_latents}], got {n!r}.")
        values, ids = latents.topk(n, dim=-1)
        return torch.where(values > 0, ids, torch.full_like(ids, -1))

    # -- training helpers --------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_from_data_(self, x: Float[Tensor, "... dim"]) -> None:
        """Set `input_scale` (scaled inputs have mean squared norm d_in) and `b_dec` (their mean) from a sample."""
        xg = self._grouped(x).reshape(-1, self.cfg.groups, self.cfg.d_in).to(self.W_dec.dtype)
        mean_sq = xg.pow(2).sum(-1).mean(0)  # (groups,)
        scale = (mean_sq / self.cfg.d_in).sqrt().clamp_min(1e-8)
        self.input_scale.copy_(scale)
        self.b_dec.copy_((xg / scale[:, None]).mean(0))

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Decoder rows back to unit norm (the L1 penalty's scale, and TopK's convention)."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    def extra_repr(self) -> str:
        """The architecture and sizes, for `repr`."""
        c = self.cfg
        sparsity = f"k={c.k}" if c.architecture == "topk" else "l1"
        return f"{c.architecture}: groups={c.groups}, d_in={c.d_in}, n_latents={c.n_latents}, {sparsity}"


@torch.no_grad()
def typical_values(
    sae: SparseAutoencoder, x: Float[Tensor, "... dim"], chunk_tokens: int = 4096
) -> Float[Tensor, "... n_latents"]:
    """Each latent's median value over the tokens of `x` where it is active, `([groups,] n_latents)`.

    0 where it is never active. What steering forces a latent to: the value it takes when the SAE itself uses it."""
    xg = sae._grouped(x).reshape(-1, sae.cfg.groups, sae.cfg.d_in)
    g, n = sae.cfg.groups, sae.cfg.n_latents
    keys, values = [], []
    for start in range(0, xg.shape[0], chunk_tokens):
        latents = sae.encode(xg[start : start + chunk_tokens].to(sae.W_dec.dtype))  # (m, g, n)
        m, grp, lat = latents.nonzero(as_tuple=True)
        keys.append(grp * n + lat)
        values.append(latents[m, grp, lat].float())
    key, value = torch.cat(keys), torch.cat(values)
    out = torch.zeros(g * n, device=value.device)
    if key.numel():
        order = torch.argsort(value, stable=True)  # by value first, then (stable) by key below
        key, value = key[order], value[order]
        order = torch.argsort(key, stable=True)
        key, value = key[order], value[order]  # by key, values ascending within each key
        uniq, counts = torch.unique_consecutive(key, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        out[uniq] = value[starts + (counts - 1) // 2]  # the lower median
    out = out.view(g, n)
    return out if sae.cfg.groups > 1 else out[0]


# ------------------------------------------------------------------------------------------------------------
# save / load
# ------------------------------------------------------------------------------------------------------------
def _check_replaceable(path: Path) -> None:
    """Refuse to replace anything but nothing, an empty folder, or a folder `save_sae` wrote (only its files)."""
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        raise FileExistsError(f"Refusing to replace {path}: it is not a folder save_sae wrote. Save elsewhere.")
    entries = set(os.listdir(path))
    if entries and (entries - {CONFIG_FILE, WEIGHTS_FILE} or CONFIG_FILE not in entries):
        raise FileExistsError(
            f"Refusing to replace {path}: it holds {sorted(entries)[:5]}, not only a saved SAE, and replacing it would "
            "delete them. Save to another folder."
        )


def save_sae(sae: SparseAutoencoder, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write `sae` to the folder `path` atomically: `sae.json` (config and `extra`) and `sae.safetensors`.

    `extra` is JSON-able data recorded beside the config (e.g. how it was trained). Returns the path."""
    if not isinstance(sae, SparseAutoencoder):
        raise TypeError(f"save_sae needs a SparseAutoencoder, got {type(sae).__name__}.")
    path = user_path(path)
    record = {
        "format": SAE_FORMAT,
        "version": SAE_VERSION,
        "config": dataclasses.asdict(sae.cfg),
        "extra": extra or {},
    }
    text = json.dumps(record, indent=1, allow_nan=False)  # before anything is written: a bad `extra` fails here
    with atomic_dir(path, check=_check_replaceable) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()}, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(text)
    return path


def read_sae_record(path: str | os.PathLike) -> dict[str, Any]:
    """The `sae.json` of a saved SAE (format, version, config, extra), checked to be one."""
    path = readable_dir(recover_dir(user_path(path)))
    where = path / CONFIG_FILE
    if not where.is_file():
        raise FileNotFoundError(f"{path} is not a saved SAE: it has no {CONFIG_FILE} (save_sae writes one).")
    try:
        record = json.loads(where.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"Damaged SAE config {where}: {err}. Save the SAE again.") from err
    if not isinstance(record, dict) or record.get("format") != SAE_FORMAT:
        raise ValueError(f"{where} is not a {SAE_FORMAT} config (format {record.get('format')!r}).")
    if record.get("version") != SAE_VERSION:
        raise ValueError(f"{where} has version {record.get('version')!r}; this cbinterp reads version {SAE_VERSION}.")
    return record


def load_sae(path: str | os.PathLike, device: torch.device | str | None = None) -> SparseAutoencoder:
    """A `SparseAutoencoder` saved with `save_sae`, on `device` (its `extra` in `read_sae_record`)."""
    record = read_sae_record(path)
    path = user_path(path)
    try:
        cfg = SAEConfig(**record["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"Damaged SAE config {path / CONFIG_FILE}: {err}. Save the SAE again.") from err
    sae = SparseAutoencoder(cfg, device="meta")
    state = load_file(str(path / WEIGHTS_FILE), device="cpu")
    expected = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        raise ValueError(
            f"The weights in {path / WEIGHTS_FILE} do not fit its config: expected {expected}, got {got}. Save the "
            "SAE again."
        )
    sae = SparseAutoencoder(cfg, device=device, dtype=state["W_dec"].dtype)
    sae.load_state_dict(state)
    return sae
