"""Attach codebooks to a HookedTransformer or TransformerBridge at hook names; find, bypass and remove them."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager as ContextManager
from functools import partial

import torch
from tqdm.auto import tqdm
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities import Slice

from cbinterp.core import tl_compat as tc
from cbinterp.core.codebooks.codebook import Codebook, CodebookConfig
from cbinterp.core.codebooks.naming import CODES_HOOK, CODES_SUFFIX, INPUT_HOOK, INPUT_SUFFIX, did_you_mean
from cbinterp.core.tl_compat import Model
from cbinterp.core.training.determinism import deterministic_on_cpu

__all__ = [
    "SITE_HOOKS",
    "attach_codebooks",
    "codebooks_bypassed",
    "codebooks_observed",
    "counting_usage",
    "detach_codebooks",
    "get_codebooks",
    "kmeans_init_codebooks",
]

#: Site aliases and the hook name each stands for in every selected layer.
SITE_HOOKS = {
    "attn": "blocks.{layer}.attn.hook_z",
    "mlp": "blocks.{layer}.hook_mlp_out",
    "resid": "blocks.{layer}.hook_resid_post",
}

PerSite = int | Mapping[str, int]


#: The model check every public entry point runs (a HookedTransformer or a TransformerBridge).
require_hooked_transformer = tc.require_model


def get_codebooks(model: Model) -> dict[str, Codebook]:
    """Every codebook in the model, by the hook name it sits at, in forward order."""
    require_hooked_transformer(model)
    return {tc.site_name(model, name, m): m for name, m in model.named_modules() if isinstance(m, Codebook)}


def resolve_sites(
    model: Model,
    sites: str | Sequence[str],
    layers: Sequence[int] | None = None,
) -> list[tuple[str, str]]:
    """Expand site aliases, `{layer}` templates and hook names into `(site, hook_name)` pairs, checking each exists.

    Site aliases are "attn", "mlp" and "resid"."""
    if isinstance(sites, str):
        sites = [sites]
    sites = list(sites)
    if not sites:
        raise ValueError(f"No sites given: name at least one of {sorted(SITE_HOOKS)}, a hook name or a template.")
    n_layers = model.cfg.n_layers
    if layers is None:
        layers = range(n_layers)
    layers = list(layers)
    for layer in layers:
        if not isinstance(layer, int) or not 0 <= layer < n_layers:
            raise ValueError(f"Layer {layer!r} is out of range: this model has layers 0..{n_layers - 1}.")
    hook_points = model.hook_dict  # a bridge computes it on each access
    pairs = []
    for site in sites:
        template = SITE_HOOKS.get(site, site)
        names = [template.format(layer=l) for l in layers] if "{layer}" in template else [template]
        for name in names:
            module = hook_points.get(name)
            if not isinstance(module, HookPoint) or name.endswith((CODES_SUFFIX, INPUT_SUFFIX)):
                # suggest only names that would be accepted: never a codebook's own hooks (nor the name refused)
                valid = [n for n in hook_points if not n.endswith((CODES_SUFFIX, INPUT_SUFFIX))]
                inner = (
                    " It is a codebook's own hook point; codebooks sit at the hook names themselves."
                    if name.endswith((CODES_SUFFIX, INPUT_SUFFIX))
                    else ""
                )
                raise ValueError(
                    f"Unknown hook site {site!r} (hook name {name!r}).{inner} Use one of {sorted(SITE_HOOKS)} or a "
                    f"hook name of the model{did_you_mean(name, valid)} `model.hook_dict` lists them all."
                )
            pairs.append((site, name))
    return pairs


def _per_site(value: PerSite, site: str, hook_name: str, what: str) -> int:
    if isinstance(value, Mapping):
        for key in (hook_name, site):
            if key in value:
                return value[key]
        raise ValueError(f"No {what} given for site {site!r} ({hook_name}); add it to the {what} mapping.")
    return value


def _activation_sites(model: Model, names: list[str]) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.device]]:
    """Trailing (non batch, non position) shape of each hook's activation, and its device, from a one-token forward.

    The device is where a codebook at the hook must sit: in a model split over devices (`n_devices > 1`) each block
    computes on its own, and a codebook on `model.cfg.device` would mix them."""
    shapes, devices = {}, {}

    def record(name, tensor, hook):  # by the name asked for: a bridge's hook point is named after its module path
        shapes[name] = tuple(tensor.shape[2:])
        devices[name] = tensor.device

    tokens = torch.zeros(1, 1, dtype=torch.long, device=model.cfg.device)
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(n, partial(record, n)) for n in names])
    return shapes, devices


def attach_codebooks(
    model: Model,
    sites: str | Sequence[str] | Mapping[str, Codebook] = ("attn", "mlp"),
    n_codes: PerSite = 1000,
    k: PerSite = 1,
    layers: Sequence[int] | None = None,
    seed: int = 0,
    **codebook_kwargs,
) -> Model:
    """Insert codebooks into `model` in place at the given sites and return it.

    Each codebook goes on the device its site's activation is on (in a model split over devices, its block's),
    in the model's dtype.

    Args:
        sites: "attn" (one codebook per head at `blocks.{l}.attn.hook_z`), "mlp" (`blocks.{l}.hook_mlp_out`),
            "resid" (`blocks.{l}.hook_resid_post`), hook names, or hook-name templates with `{layer}`; or a
            mapping from hook name to an existing `Codebook` (e.g. one trained in another instance of the same
            architecture, or loaded with `load_codebook`), attached as it is (moved to its site's device).
        n_codes, k: an int for every site, or a mapping from site alias or hook name to int.
        layers: which layers the aliases and templates expand to (default: all).
        seed: codebook i gets seed `seed + i`.
        codebook_kwargs: further `Codebook` settings (similarity, normalize_input, loss, dead_after, ...).
    """
    require_hooked_transformer(model)
    if isinstance(sites, Mapping):
        return _attach_existing(model, sites)
    pairs = resolve_sites(model, sites, layers)
    names = [name for _, name in pairs]
    _check_free(model, names, sites)
    shapes, devices = _activation_sites(model, names)
    user_groups = codebook_kwargs.pop("groups", None)
    new_codebooks = []
    for site_index, (site, name) in enumerate(pairs):
        shape = shapes[name]
        if len(shape) == 1:
            groups, dim = 1, shape[0]
        elif len(shape) == 2:
            groups, dim = shape
        else:
            raise ValueError(
                f"Cannot quantize {name}: its activation has per-position shape {shape}; expected (dim,) or (heads, "
                "dim)."
            )
        if user_groups is not None and user_groups != groups:
            raise ValueError(
                f"groups={user_groups} does not match {name}, which has {groups} "
                f"{'heads' if groups > 1 else 'group'} of size {dim}; leave groups out to take it from the model."
            )
        cfg = CodebookConfig(
            dim=dim,
            groups=groups,
            n_codes=_per_site(n_codes, site, name, "n_codes"),
            k=_per_site(k, site, name, "k"),
            seed=seed + site_index,
            **codebook_kwargs,
        )
        new_codebooks.append((name, Codebook.from_config(cfg, device=devices[name], dtype=model.cfg.dtype)))
    # Insert only once every site's codebook is built, so that a bad argument leaves the model untouched.
    for name, codebook in new_codebooks:
        insert_codebook(model, name, codebook, setup=False)
    refresh_hooks(model)
    return model


def _check_free(model: Model, names: list[str], sites) -> None:
    """Every name is a hook site without a codebook or hooks, listed once."""
    existing = get_codebooks(model)
    for name in names:
        if name in existing:
            raise ValueError(f"{name} already has a codebook; call detach_codebooks(model, [{name!r}]) first.")
        hook_point = model.hook_dict[name]
        if hook_point.fwd_hooks or hook_point.bwd_hooks:
            raise ValueError(
                f"{name} has hooks attached; remove them (model.reset_hooks()) before attaching a codebook."
            )
    if len(set(names)) != len(names):
        raise ValueError(f"A hook site is listed twice in {list(sites)}.")


def _attach_existing(model: Model, codebooks: Mapping[str, Codebook]) -> Model:
    """Attach given `Codebook` objects at hook names, after checking that each fits its activation."""
    if not codebooks:
        raise ValueError("No codebooks given: the mapping from hook name to Codebook is empty.")
    for name, codebook in codebooks.items():
        if not isinstance(codebook, Codebook):
            raise TypeError(f"The value for {name!r} is a {type(codebook).__name__}, not a Codebook.")
    names = [name for _, name in resolve_sites(model, list(codebooks))]
    _check_free(model, names, list(codebooks))
    shapes, devices = _activation_sites(model, names)
    placed = []
    for name, codebook in zip(names, codebooks.values()):
        c = codebook.cfg
        want = (c.dim,) if c.groups == 1 else (c.groups, c.dim)
        if tuple(shapes[name]) != want:
            raise ValueError(
                f"The codebook for {name} takes activations of per-position shape {want}, but {name} has "
                f"{tuple(shapes[name])}; attach it at a site of the architecture it was trained in."
            )
        if any(other is codebook for _, other in placed):
            raise ValueError(f"The same Codebook object is given for two sites ({name} among them); copy it first.")
        placed.append((name, codebook.to(device=devices[name], dtype=model.cfg.dtype)))
    for name, codebook in placed:
        insert_codebook(model, name, codebook, setup=False)
    refresh_hooks(model)
    return model


def insert_codebook(model: Model, hook_name: str, codebook: Codebook | HookPoint, setup: bool = True) -> None:
    """Put `codebook` (or a plain `HookPoint`, to detach) at `hook_name` (low level; `attach_codebooks` checks)."""
    tc.replace_hook_point(model, hook_name, codebook)
    if setup:
        refresh_hooks(model)


def detach_codebooks(model: Model, names: Sequence[str] | None = None) -> Model:
    """Remove codebooks (all, or those at `names`) and restore plain hook points; returns the model."""
    codebooks = get_codebooks(model)
    names = list(codebooks) if names is None else list(names)
    for name in names:
        if name not in codebooks:
            raise ValueError(f"No codebook at {name!r}; codebooks are at {list(codebooks)}.")
        insert_codebook(model, name, HookPoint(), setup=False)
    refresh_hooks(model)
    return model


@contextlib.contextmanager
def _codebooks_set(model: Model, attr: str, value: bool, names: Sequence[str] | None = None):
    """Set a run-time flag of the codebooks (all, or those at `names`) inside the block, and restore it after."""
    codebooks = get_codebooks(model)
    if names is not None:
        unknown = [n for n in names if n not in codebooks]
        if unknown:
            raise ValueError(f"No codebook at {unknown[0]!r}{did_you_mean(unknown[0], codebooks)}")
    chosen = [codebooks[n] for n in (codebooks if names is None else names)]
    previous = [getattr(cb, attr) for cb in chosen]
    for cb in chosen:
        setattr(cb, attr, value)
    try:
        yield model
    finally:
        for cb, was in zip(chosen, previous):
            setattr(cb, attr, was)


def codebooks_bypassed(model: Model, names: Sequence[str] | None = None) -> ContextManager:
    """Run the model with its codebooks (all, or those at `names`) passing activations through, computing no codes."""
    return _codebooks_set(model, "bypass", True, names)


def codebooks_observed(model: Model, names: Sequence[str] | None = None) -> ContextManager:
    """Run the model with its codebooks (all, or those at `names`) observing only.

    Codes are computed and show in `hook_codes` and caches, but each activation passes through unchanged, so the
    outputs are the plain model's (what `use_error_term=True` gives SAELens users). Rewriting codes in this mode
    changes nothing downstream."""
    return _codebooks_set(model, "observe_only", True, names)


def training_codebooks(model: Model, on: bool = True) -> ContextManager:
    """Mark the forwards inside as training steps of the codebooks (what `train` does for its steps).

    Only then are the training statistics updated and dead codes replaced. Restores the previous state on exit."""
    return _codebooks_set(model, "in_train_loop", on)


def counting_usage(model: Model, names: Sequence[str] | None = None) -> ContextManager:
    """Count code usage (`Codebook.counts`, `n_dead`, `dead_codes`) in the forwards inside.

    Only for the codebooks at `names` (default all). Outside it (and outside `train`), forwards leave the counts
    alone."""
    return _codebooks_set(model, "track_usage", True, names)


def refresh_hooks(model: Model) -> None:
    """Rebuild the hook registry after codebooks were inserted or removed (and keep per-head code axes intact)."""
    tc.refresh_hooks(model, get_codebooks(model))
    grouped = {f"{n}.{sub}" for n, cb in get_codebooks(model).items() if cb.grouped for sub in (CODES_HOOK, INPUT_HOOK)}
    if grouped:
        model.get_caching_hooks = partial(_get_caching_hooks_with_head_axis, model, grouped)
    else:
        model.__dict__.pop("get_caching_hooks", None)


def _get_caching_hooks_with_head_axis(model: Model, head_axis_names: set[str], *args, **kwargs):
    """`get_caching_hooks` that slices `pos_slice` along the position axis (-3) of per-head codebook tensors.

    TransformerLens picks the position axis by the hook name's ending; `...hook_z.hook_codes` is
    `(batch, pos, head, k)`, so without this it would slice the head axis.
    """
    plain = type(model).get_caching_hooks
    bound = inspect.signature(plain).bind(model, *args, **kwargs)
    bound.apply_defaults()
    params = dict(bound.arguments)
    params.pop("self")
    pos_slice = params["pos_slice"]
    cache, fwd, bwd = plain(model, **params)
    if pos_slice is None:
        return cache, fwd, bwd
    _, plain_fwd, plain_bwd = plain(model, **{**params, "pos_slice": None, "cache": cache})
    slice_ = Slice.unwrap(pos_slice)

    def save_then_slice(save, suffix, tensor, hook):
        save(tensor, hook)
        key = hook.name + suffix
        if cache[key].dim() >= 3:
            cache[key] = slice_.apply(cache[key], dim=-3)

    def patched(hooks, plain_hooks, suffix):
        return [
            (name, partial(save_then_slice, plain, suffix) if name in head_axis_names else hook)
            for (name, hook), (_, plain) in zip(hooks, plain_hooks)
        ]

    return cache, patched(fwd, plain_fwd, ""), patched(bwd, plain_bwd, "_grad")


@torch.no_grad()
def kmeans_init_codebooks(
    model: Model,
    tokens: torch.Tensor,
    iters: int = 10,
    seed: int = 0,
    *,
    sample_size: int | None = None,
    batch_size: int = 64,
    progress: bool = True,
    mean_of_k: bool = True,
) -> None:
    """Initialise every codebook to k-means centroids of its input on `tokens`, in forward order.

    Each codebook sees the activations produced with the codebooks before it already in place.

    Args:
        tokens: `(batch, pos)` token ids; the activations at all their positions are the k-means data.
        sample_size: use at most this many positions per codebook (a uniform sample, seeded by `seed`), which
            bounds the time and memory of the Lloyd iterations.
        batch_size: sequences per forward pass while the activations are collected.
        progress: show a progress bar over the codebooks.
        mean_of_k: divide the centroids of a codebook that sums its k codes by k, so that its output starts at
            the input's scale for any k. Each centroid approximates the input on its own; undivided, the sum of k
            of them is about k times the input. The selection does not change (inner-product similarity scores
            x . c / |c|). A codebook that averages its k codes (`combine="mean"`) needs no division and gets none.
            False: the raw centroids (the behaviour before this option).

    Under torch.distributed it runs once, on rank 0 (with rank 0's `tokens`), and every rank gets its codes.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if sample_size is not None and sample_size < 1:
        raise ValueError(f"sample_size must be None (all positions) or >= 1, got {sample_size}.")
    codebooks = get_codebooks(model)
    if not codebooks:
        raise ValueError("The model has no codebooks to initialise; attach some with attach_codebooks first.")
    tokens = torch.as_tensor(tokens)
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (batch, pos) token ids, got shape {tuple(tokens.shape)}.")
    from cbinterp.core.training import (
        distributed as dd,  # here: distributed imports nothing of attach, but keep it light
    )

    if dd.active():
        if dd.is_main():
            with deterministic_on_cpu(next(model.parameters()).device):
                _kmeans_init(model, codebooks, tokens, iters, seed, sample_size, batch_size, progress, mean_of_k)
        for name, codebook in codebooks.items():  # the other ranks wait here for rank 0's codes
            dd.broadcast_(codebook.weight.data, f"the k-means codes of {name}", 0)
        return
    with deterministic_on_cpu(next(model.parameters()).device):
        _kmeans_init(model, codebooks, tokens, iters, seed, sample_size, batch_size, progress, mean_of_k)


def sums_codes(codebook: Codebook) -> bool:
    """Whether `codebook`'s output is the sum of its k codes, so that k-means centroids need dividing by k.

    A codebook configured to average them (`combine="mean"`) is not."""
    return getattr(codebook.cfg, "combine", "sum") == "sum"


def _kmeans_init(model, codebooks, tokens, iters, seed, sample_size, batch_size, progress, mean_of_k) -> None:
    bar = tqdm(codebooks.items(), desc="k-means init", disable=not progress, dynamic_ncols=True)
    for index, (name, codebook) in enumerate(bar):
        parts = []

        def grab(tensor, hook):
            parts.append(tensor.reshape(-1, *tensor.shape[2:]))  # noqa: B023 (used within this iteration)

        with codebooks_bypassed(model, list(codebooks)[index:]):
            for start in range(0, tokens.shape[0], batch_size):
                batch = tokens[start : start + batch_size].to(model.cfg.device)
                model.run_with_hooks(batch, fwd_hooks=[(name + INPUT_SUFFIX, grab)])
        x = torch.cat(parts) if len(parts) > 1 else parts[0]
        if sample_size is not None and x.shape[0] > sample_size:
            generator = torch.Generator().manual_seed(seed + index)
            rows = torch.randperm(x.shape[0], generator=generator)[:sample_size].sort().values
            x = x[rows.to(x.device)]
        codebook.kmeans_init(x, iters=iters, seed=seed + index)
        if mean_of_k and codebook.k > 1 and sums_codes(codebook):
            # before the next codebook's data is collected: it sees this codebook's output at the right scale
            codebook.weight.div_(codebook.k)
