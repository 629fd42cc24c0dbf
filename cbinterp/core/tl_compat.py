"""TransformerLens 3 and 4 behind one small interface: the model classes, their hook points, and building models.

cbinterp runs on a `HookedTransformer` (TransformerLens 3.x) or a `TransformerBridge` (3.x and 4.x, where
`HookedTransformer` is gone). Everything else in the package is one implementation; the places where the two classes
differ go through here:

* `MODEL_TYPES` / `Model`: the accepted classes (for `isinstance` and annotations), `require_model` the check;
* `replace_hook_point` and `refresh_hooks`: put a module (a `Codebook`) at a hook name, wherever the module tree holds
  that hook point (a bridge calls `blocks.0.attn.hook_z` an alias of `blocks.0.attn.o.hook_in`, and in compatibility
  mode holds it under both), and rebuild the registry so that its nested hook points are listed under the hook name
  the user gave (`blocks.0.attn.hook_z.hook_codes`);
* `state_dict` / `load_state_dict`: every parameter and buffer, codebooks included (a bridge's own `state_dict()`
  leaves out modules it does not know);
* `unused_parameters`: what a bridge holds but never reads (kept out of training, so that DDP sees every trained
  parameter get a gradient);
* `build_hooked`: a config-built `HookedTransformer`, with a clear error where TransformerLens 4 has none.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any, Union

import torch

__all__ = [
    "BRIDGE_SUPPORTED",
    "HAS_HOOKED",
    "MODEL_TYPES",
    "Model",
    "TL_MAJOR",
    "TL_VERSION",
    "boot_bridge",
    "build_hooked",
    "is_bridge",
    "load_state_dict",
    "no_hooked_message",
    "refresh_hooks",
    "replace_hook_point",
    "require_hooked",
    "require_model",
    "state_dict",
    "unused_parameters",
]

TL_VERSION: str = importlib.metadata.version("transformer-lens")
TL_MAJOR: int = int(TL_VERSION.split(".")[0])

try:  # removed in TransformerLens 4.0 (importing it raises an ImportError with a migration note)
    from transformer_lens import HookedTransformer, HookedTransformerConfig
except ImportError:
    HookedTransformer = HookedTransformerConfig = None
try:
    from transformer_lens.model_bridge import TransformerBridge
except ImportError:  # pragma: no cover - every supported TransformerLens (>= 3.9) has it
    TransformerBridge = None

#: Whether this TransformerLens has `HookedTransformer` (3.x).
HAS_HOOKED: bool = HookedTransformer is not None
#: Whether cbinterp accepts a TransformerBridge here: from TransformerLens 4 on. 3.x's bridge is an earlier design
#: (its `run_with_cache(pos_slice=...)` slices the head axis of per-head codebook tensors, and it has no `mod_dict`);
#: on 3.x a bridge is refused with a clear error rather than giving subtly different caches.
BRIDGE_SUPPORTED: bool = TransformerBridge is not None and TL_MAJOR >= 4
#: The model classes cbinterp accepts, for `isinstance`.
MODEL_TYPES: tuple[type, ...] = tuple(
    t for t, ok in ((HookedTransformer, HAS_HOOKED), (TransformerBridge, BRIDGE_SUPPORTED)) if ok
)
#: The annotation for "a model cbinterp accepts".
Model = Union[MODEL_TYPES]  # noqa: UP007 (a tuple of classes known only at import time)


def is_bridge(model) -> bool:
    """Whether `model` is a TransformerBridge (as opposed to a HookedTransformer)."""
    return TransformerBridge is not None and isinstance(model, TransformerBridge)


def require_model(model) -> Model:
    """`model` itself, after checking that it is a HookedTransformer or a TransformerBridge."""
    if not isinstance(model, MODEL_TYPES):
        if TransformerBridge is not None and isinstance(model, TransformerBridge):
            raise TypeError(
                f"cbinterp supports TransformerBridge from transformer-lens 4 on; this is {TL_VERSION}. Install "
                "transformer-lens>=4.3,<5 for bridges, or build the model as a HookedTransformer here."
            )
        raise TypeError(
            f"cbinterp needs a transformer_lens.HookedTransformer or TransformerBridge, got {type(model).__name__}. "
            f"Build the model with HookedTransformer (transformer-lens 3.x) or boot it with "
            f"TransformerBridge.boot_transformers(path) (this is transformer-lens {TL_VERSION})."
        )
    return model


def no_hooked_message(what: str, instead: str | None = None) -> str:
    """Why `what` fails on a TransformerLens without HookedTransformer, and the fix.

    `instead`: what to do on this TransformerLens (default: bring a bridge to any function that takes a model)."""
    instead = instead or (
        "bring a model booted with TransformerBridge.boot_transformers(path) (every cbinterp function that takes a "
        "model accepts one)"
    )
    return (
        f"{what} builds a HookedTransformer, which transformer-lens {TL_VERSION} no longer has. Install "
        f"transformer-lens>=3.9,<4 for it, or {instead}."
    )


def require_hooked(what: str, instead: str | None = None) -> None:
    """Raise a clear ImportError (`no_hooked_message`) where this TransformerLens (4.x) has no HookedTransformer."""
    if not HAS_HOOKED:
        raise ImportError(no_hooked_message(what, instead))


def build_hooked(cfg) -> Any:
    """`HookedTransformer(cfg)`, or a clear ImportError on TransformerLens 4."""
    require_hooked("This path")
    return HookedTransformer(cfg)


def replace_hook_point(model, hook_name: str, module: torch.nn.Module) -> None:
    """Put `module` (a HookPoint: a Codebook, or a plain one to detach) where the hook point of `hook_name` sits.

    On a bridge the old hook point's tensor conversion (a bridge shows `hook_z` as `(batch, pos, heads, d_head)` while
    the tensor flowing through is `(batch, pos, d_model)`) moves to the new module, which applies it itself; and the
    module takes the old one's place wherever the tree holds it: in compatibility mode a bridge installs its aliases
    as attributes too (`attn.hook_z` is `attn.o.hook_in`), and an alias left on the old hook point would read and
    hook a module off the forward."""
    if not is_bridge(model):
        parent_name, _, attr = hook_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module.hook_conversion = getattr(getattr(parent, attr), "hook_conversion", None)
        setattr(parent, attr, module)
        return
    old = model.hook_dict.get(hook_name)
    if old is None:
        raise ValueError(f"{hook_name!r} is not a hook point of this bridge.")
    module.hook_conversion = getattr(old, "hook_conversion", None)
    module.cbinterp_site = hook_name  # the registry may name it by an alias or by its path; it answers to this
    holders = [(parent, attr) for parent in model.modules() for attr, child in parent._modules.items() if child is old]
    if not holders:
        raise RuntimeError(f"The hook point of {hook_name!r} is not in the bridge's module tree; cannot replace it.")
    for parent, attr in holders:
        setattr(parent, attr, module)


def site_name(model, path: str, module: torch.nn.Module) -> str:
    """The hook name a module placed by `replace_hook_point` answers to (its module path on a HookedTransformer)."""
    if not is_bridge(model):
        return path
    return getattr(module, "cbinterp_site", None) or path


def _compatibility_mode_after_codebooks(*args, **kwargs) -> None:
    """A bridge's `enable_compatibility_mode` while it has codebooks: refused, with the order that works."""
    raise RuntimeError(
        "Enable compatibility mode before attaching codebooks: it rebuilds the hook registry (the codes would be "
        "cached under other names) and, with weight processing, changes what reaches each codebook. Detach them "
        "(codebooks = cbinterp.get_codebooks(model); cbinterp.detach_codebooks(model)), enable it, and attach them "
        "again (cbinterp.attach_codebooks(model, codebooks))."
    )


def refresh_hooks(model, sites: dict[str, torch.nn.Module]) -> None:
    """Rebuild the hook registry after modules were put at hook names (`sites`: hook name -> module).

    Nested hook points of each module are registered under its hook name (`<hook name>.hook_codes`) and named so,
    on a bridge as on a HookedTransformer: on a bridge, only so (the scan also lists them under each path and alias
    the module sits at). A bridge with codebooks refuses `enable_compatibility_mode`, which would undo this."""
    if not is_bridge(model):
        model.setup()
        return
    if sites:
        model.enable_compatibility_mode = _compatibility_mode_after_codebooks
    else:
        model.__dict__.pop("enable_compatibility_mode", None)
    model.clear_hook_registry()
    model._initialize_hook_registry()
    registry = model._hook_registry
    for name, module in sites.items():
        nested = {sub_name: sub for sub_name, sub in module.named_modules() if sub_name and hasattr(sub, "fwd_hooks")}
        ids = {id(sub) for sub in nested.values()}
        for key in [key for key, hook in registry.items() if id(hook) in ids]:
            del registry[key]
        for sub_name, sub in nested.items():
            sub.name = f"{name}.{sub_name}"
            registry[sub.name] = sub
        module.name = name


def _bridge_modules(model) -> dict[str, torch.nn.Module]:
    """A bridge's module tree as the wrapped Hugging Face model holds it (what `parameters()` walks)."""
    return model.original_model


def state_dict(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `model`, codebooks included (a bridge's: under the Hugging Face model's names)."""
    if not is_bridge(model):
        return model.state_dict()
    return _bridge_modules(model).state_dict()


def load_state_dict(model, state: dict[str, torch.Tensor], strict: bool = True):
    """Load what `state_dict` gave into `model`; returns torch's (missing, unexpected) keys."""
    if not is_bridge(model):
        return model.load_state_dict(state, strict=strict)
    return _bridge_modules(model).load_state_dict(state, strict=strict)


def unused_parameters(model) -> list[torch.nn.Parameter]:
    """The parameters `model`'s forward never reads: none on a HookedTransformer.

    A bridge of a fused-QKV model (GPT-2's `c_attn`) splits the fused matrix into q, k and v copies when it boots and
    runs on those; the fused one stays in the Hugging Face model, stale (TransformerLens leaves it out of the bridge's
    own state_dict). Training it would give it no gradient, which DistributedDataParallel refuses."""
    if not is_bridge(model):
        return []
    from transformer_lens.model_bridge.generalized_components.joint_qkv_attention import JointQKVAttentionBridge

    used: set[int] = set()  # a parameter the fused matrix shares with a used module is used
    unused: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, JointQKVAttentionBridge) and isinstance(module._modules.get("qkv"), torch.nn.Module):
            unused.update((id(p), p) for p in module.qkv.parameters())
            for name in ("q", "k", "v", "o"):
                if isinstance(module._modules.get(name), torch.nn.Module):
                    used.update(id(p) for p in module._modules[name].parameters())
    return [p for i, p in unused.items() if i not in used]


#: Run-time settings of a Hugging Face config that booting a bridge sets (and that a fresh model must not get).
_BOOT_SETTINGS = ("output_attentions", "output_hidden_states", "attn_implementation", "_attn_implementation")


def bridge_description(model) -> dict:
    """What rebuilds a bridge's model without its source folder: the Hugging Face class name and config."""
    hf_model = model.original_model
    config = hf_model.config.to_dict()
    for key in _BOOT_SETTINGS:  # set by the bridge when it boots, and refused by a config saved with them
        config.pop(key, None)
    return {"architecture": type(hf_model).__name__, "hf_config": config}


def build_bridge(description: dict, tokenizer=None, device=None):
    """A TransformerBridge of the model `description` (from `bridge_description`) names, its weights not loaded yet.

    Offline and without running code from anywhere: the class must be one of `transformers`' causal LMs; the model is
    written to a private temporary folder and booted from there, as `boot_transformers(path)` boots a user's folder.
    """
    import transformers

    architecture = description.get("architecture")
    model_class = getattr(transformers, str(architecture), None)
    hf_config = description.get("hf_config")
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        raise ValueError(f"{architecture!r} is not a transformers model class; the saved bridge cannot be rebuilt.")
    if not isinstance(hf_config, dict) or not isinstance(hf_config.get("model_type"), str):
        raise ValueError("The saved bridge has no Hugging Face config (hf_config with a model_type). Re-save it.")
    config = transformers.AutoConfig.for_model(**hf_config)
    return boot_bridge(model_class(config), tokenizer=tokenizer, device=device)


def boot_bridge(hf_model, tokenizer=None, device=None):
    """A TransformerBridge of the Hugging Face model `hf_model` (in memory), with `tokenizer`, on `device`.

    The model is written to a private temporary folder and booted from there, as `boot_transformers(path)` boots a
    user's folder: offline, and without running code from anywhere."""
    import tempfile

    if TransformerBridge is None:  # pragma: no cover
        raise ImportError(f"transformer-lens {TL_VERSION} has no TransformerBridge.")
    with tempfile.TemporaryDirectory(prefix="cbinterp-bridge-") as tmp:
        hf_model.save_pretrained(tmp)
        if tokenizer is not None:  # booting reloads it from the folder (to settle its BOS token)
            tokenizer.save_pretrained(tmp)
        return TransformerBridge.boot_transformers(tmp, device=device)
