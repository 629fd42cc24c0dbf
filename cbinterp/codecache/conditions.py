"""What besides the weights and the data decides the codes `cache_codes` records: the conditions of a run.

A code cache records, and a resume compares, each codebook's run-time mode (codes applied, or only observed under
`codebooks_observed`), the codebook settings that steer the search (similarity, input normalisation), and every
forward hook and pre-hook on the model (`intervene`, `model.hooks`, permanent hooks, torch's global module hooks):
each hook by its name and a fingerprint of its code and of the values it closes over (tensors, numbers, strings,
containers, bound objects, other modules' weights), so that `ablate_codes` made twice with the same ids compares
equal and with other ids does not. Hooks are compared on every module, not only on those before a codebook: a
resume is refused rather than risk mixing codes made under two conditions.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import types

import numpy as np
import torch
from torch import nn

from cbinterp.core.codebooks.attach import get_codebooks
from cbinterp.core.storage import manifest as mf
from cbinterp.core.tl_compat import Model

__all__ = ["check_runnable", "check_same_run", "describe_difference", "run_conditions"]

_SEARCH_SETTINGS = ("similarity", "normalize_input")  # the codebook settings besides n_codes, k, groups and dim
_MAX_DEPTH = 12


def check_runnable(model: Model) -> None:
    """Raise a ValueError if the model's codebooks cannot give codes to cache (bypassed) or change while running."""
    for name, cb in get_codebooks(model).items():
        if cb.bypass:
            raise ValueError(
                f"The codebook {name} is bypassed (codebooks_bypassed): it computes no codes to cache. Cache outside "
                "codebooks_bypassed, or use codebooks_observed(model) to record codes without applying them."
            )
        if cb.in_train_loop:
            raise ValueError(
                f"cache_codes runs inside training_codebooks (the codebook {name} is marked as training): its "
                "forwards would replace dead codes, changing the codebook while it is cached. Cache outside it."
            )


def run_conditions(model: Model) -> dict:
    """The conditions of a run of `model` now, as JSON: its codebooks' modes, settings, and hooks.

    `{"codebooks": {name: "applied" | "observed"}, "settings": {name: {...}}, "hooks": {module name: [{"fn": readable
    name, "sha256": fingerprint}, ...]}}`."""
    codebooks = get_codebooks(model)
    owned = {id(m): name for name, m in model.named_modules()}
    hooks: dict[str, list[dict]] = {}
    for name, module in model.named_modules():
        found = [("pre", fn) for fn in module._forward_pre_hooks.values()]
        found += [("post", fn) for fn in module._forward_hooks.values()]
        if found:
            hooks[name or "<model>"] = [_describe_hook(kind, fn, owned) for kind, fn in found]
    from torch.nn.modules import module as torch_module

    globals_found = [("pre", fn) for fn in torch_module._global_forward_pre_hooks.values()]
    globals_found += [("post", fn) for fn in torch_module._global_forward_hooks.values()]
    if globals_found:
        hooks["<every module (torch global hooks)>"] = [_describe_hook(k, fn, owned) for k, fn in globals_found]
    return {
        "codebooks": {name: "observed" if cb.observe_only else "applied" for name, cb in codebooks.items()},
        "settings": {name: {key: getattr(cb.cfg, key) for key in _SEARCH_SETTINGS} for name, cb in codebooks.items()},
        "hooks": hooks,
    }


def describe_difference(stored: dict, current: dict) -> str | None:
    """What differs between the conditions a cache recorded and this run's, or None if nothing does."""
    diffs = []
    for name in sorted(set(stored.get("codebooks", {})) | set(current["codebooks"])):
        a, b = stored.get("codebooks", {}).get(name), current["codebooks"].get(name)
        if a != b:
            diffs.append(f"codebook {name}: the cache has its codes {a}, this run {b}")
    for name in sorted(set(stored.get("settings", {})) | set(current["settings"])):
        a, b = stored.get("settings", {}).get(name, {}), current["settings"].get(name, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                diffs.append(f"codebook {name}: the cache has {key}={a.get(key)!r}, this run {b.get(key)!r}")
    for name in sorted(set(stored.get("hooks", {})) | set(current["hooks"])):
        a, b = stored.get("hooks", {}).get(name, []), current["hooks"].get(name, [])
        if [h.get("sha256") for h in a] != [h.get("sha256") for h in b]:
            diffs.append(f"hooks at {name}: the cache was made with {_names(a)}, this run has {_names(b)}")
    return "; ".join(diffs) if diffs else None


def check_same_run(path, old: dict, meta: dict) -> None:
    """Refuse a resume whose conditions or settings differ from those the cache was made with.

    Conditions are the hooks, observed codebooks and search settings; settings are activation_dtype and
    token_strings. Resuming under others would mix codes made two ways."""
    how = "Run it as the cache was made, or use another directory (or delete this one) to start over."
    if not isinstance(old.get("conditions"), dict):
        raise ValueError(
            f"Cannot resume the code cache at {path}: it was written by an older cbinterp that did not record the "
            "conditions of its run (hooks on the model, observed codebooks), so a resume cannot check them. Read it "
            "with CodeCache.open, or use another directory (or delete this one) to cache again."
        )
    different = describe_difference(old["conditions"], meta["conditions"])
    if different:
        raise ValueError(f"Cannot resume the code cache at {path}: {different}. {how}")
    if old.get("hooks") and old.get("activation_dtype") != meta["activation_dtype"]:
        raise ValueError(
            f"Cannot resume the code cache at {path}: its activations are stored as activation_dtype="
            f"{old.get('activation_dtype')}, this call asks for {meta['activation_dtype']}. {how}"
        )
    if old.get("token_strings") != meta.get("token_strings"):
        given = "other token_strings" if meta.get("token_strings") else "no token_strings"
        kept = "its own token_strings" if old.get("token_strings") else "no token_strings (the model's tokenizer)"
        raise ValueError(
            f"Cannot resume the code cache at {path}: it was made with {kept}, this call gives {given}. {how}"
        )


def _names(hooks: list[dict]) -> str:
    return "[" + ", ".join(h.get("fn", "?") for h in hooks) + "]" if hooks else "none"


def _describe_hook(kind: str, fn, owned: dict[int, str]) -> dict:
    digest = hashlib.sha256(kind.encode())
    _update(digest, fn, owned, 0, set())
    return {"fn": ("pre-hook " if kind == "pre" else "") + _readable(fn), "sha256": digest.hexdigest()}


def _readable(fn) -> str:
    """A hook's name without memory addresses: TransformerLens wraps the user's function in `full_hook`."""
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    if name.endswith("add_hook.<locals>.full_hook") and fn.__closure__:
        inner = dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__))).get("hook")
        if inner is not None:
            return _readable(inner.func if isinstance(inner, functools.partial) else inner)
    return name


def _update(digest, obj, owned: dict[int, str], depth: int, seen: set) -> None:
    """Feed `obj` into `digest`: values by content, code by its bytecode, the model's own modules by their name."""
    put = digest.update
    if depth > _MAX_DEPTH:
        put(b"<deep>")
        return
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, torch.dtype, torch.device)):
        put(f"{type(obj).__name__}:{obj!r};".encode())
        return
    if isinstance(obj, torch.Tensor):
        mf.update_with_tensor(digest, obj.detach())
        return
    if isinstance(obj, np.ndarray):
        put(f"ndarray{obj.dtype}{obj.shape}".encode() + np.ascontiguousarray(obj).tobytes())
        return
    if isinstance(obj, types.ModuleType):
        put(f"module:{obj.__name__};".encode())
        return
    if isinstance(obj, type) or isinstance(obj, (types.BuiltinFunctionType, types.BuiltinMethodType)):
        put(f"{getattr(obj, '__module__', '')}.{obj.__qualname__};".encode())
        return
    if id(obj) in owned:  # a part of the model: its weights are fingerprinted with the model's
        put(f"model-module:{owned[id(obj)]};".encode())
        return
    if id(obj) in seen:
        put(b"<cycle>")
        return
    seen.add(id(obj))
    put(f"{type(obj).__module__}.{type(obj).__qualname__}(".encode())
    if isinstance(obj, slice):
        for item in (obj.start, obj.stop, obj.step):
            _update(digest, item, owned, depth + 1, seen)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _update(digest, item, owned, depth + 1, seen)
    elif isinstance(obj, (set, frozenset, dict)):
        items = obj.items() if isinstance(obj, dict) else ((item, None) for item in obj)
        parts = []
        for key, value in items:  # in an order of their own: a set's iteration order is not
            sub = hashlib.sha256()
            _update(sub, key, owned, depth + 1, seen)
            _update(sub, value, owned, depth + 1, seen)
            parts.append(sub.hexdigest())
        put("".join(sorted(parts)).encode())
    elif isinstance(obj, functools.partial):
        for item in (obj.func, obj.args, obj.keywords):
            _update(digest, item, owned, depth + 1, seen)
    elif isinstance(obj, types.MethodType):
        _update(digest, obj.__func__, owned, depth + 1, seen)
        _update(digest, obj.__self__, owned, depth + 1, seen)
    elif isinstance(obj, types.FunctionType):
        _update_function(digest, obj, owned, depth, seen)
    elif isinstance(obj, types.CodeType):
        _update_code(digest, obj, owned, depth, seen)
    elif isinstance(obj, nn.Module):  # a module outside the model (e.g. a steering module): its state decides
        for key, value in sorted(obj.state_dict().items()):
            put(key.encode())
            mf.update_with_tensor(digest, value)
        _update(digest, {k: v for k, v in vars(obj).items() if not k.startswith("_")}, owned, depth + 1, seen)
    elif dataclasses.is_dataclass(obj):  # an instance: classes were named above
        for field in dataclasses.fields(obj):
            put(field.name.encode())
            _update(digest, getattr(obj, field.name), owned, depth + 1, seen)
    elif hasattr(obj, "__dict__"):
        _update(digest, vars(obj), owned, depth + 1, seen)
    put(b")")


def _update_function(digest, fn: types.FunctionType, owned, depth: int, seen: set) -> None:
    digest.update(f"{fn.__module__}.{fn.__qualname__}".encode())
    _update_code(digest, fn.__code__, owned, depth, seen)
    _update(digest, fn.__defaults__, owned, depth + 1, seen)
    _update(digest, fn.__kwdefaults__, owned, depth + 1, seen)
    cells = fn.__closure__ or ()
    for name, cell in zip(fn.__code__.co_freevars, cells):
        digest.update(name.encode())
        try:
            value = cell.cell_contents
        except ValueError:  # a cell not filled yet
            value = None
        _update(digest, value, owned, depth + 1, seen)
    for name in _global_names(fn.__code__):  # the module-level values it reads (a SCALE constant, say)
        if name in fn.__globals__:
            value = fn.__globals__[name]
            if not isinstance(value, (types.ModuleType, type)) and not callable(value):
                digest.update(name.encode())
                _update(digest, value, owned, depth + 1, seen)


def _update_code(digest, code: types.CodeType, owned, depth: int, seen: set) -> None:
    digest.update(code.co_code)
    digest.update(repr(code.co_names).encode())
    for const in code.co_consts:
        _update(digest, const, owned, depth + 1, seen)


def _global_names(code: types.CodeType) -> list[str]:
    names = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names += _global_names(const)
    return sorted(set(names))
