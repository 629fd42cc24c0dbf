"""The codebook layer: a top-k vector-quantization bottleneck that is itself a TransformerLens hook point."""

from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from cbinterp.core.codebooks.codes import NO_CODE
from cbinterp.core.codebooks.config import COMBINES, LOSSES, OPTIONS, SIMILARITIES, CodebookConfig  # noqa: F401
from cbinterp.core.codebooks.heads import check_head
from cbinterp.core.codebooks.naming import did_you_mean
from cbinterp.core.search import blocks as search_blocks
from cbinterp.core.search import fused_search

__all__ = ["Codebook", "CodebookConfig"]


class _StraightThrough(torch.autograd.Function):
    """Outputs `q`; the input gets the straight-through gradient, the codes the reconstruction gradient too.

    Backward: dL/dx = g + commit * 2(x - q)/n and dL/dq = g + recon * 2(q - x)/n, where g is the
    downstream gradient and n the number of elements: exactly the gradients of
    `downstream(q) + recon * mse(q, x.detach()) + commit * mse(x, q.detach())` with x passed straight through.
    """

    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor, recon: float, commit: float) -> Tensor:
        ctx.save_for_backward(x, q)
        ctx.recon, ctx.commit = recon, commit
        return q.view_as(q)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, q = ctx.saved_tensors
        if ctx.commit == 0 and ctx.recon == 0:
            return grad_out, grad_out, None, None
        scale = 2.0 / x.numel()
        diff = q - x
        # torch.add(a, b, alpha=s) is a + s * b in one pass
        grad_x = grad_out if ctx.commit == 0 else torch.add(grad_out, diff, alpha=-ctx.commit * scale)
        grad_q = grad_out if ctx.recon == 0 else torch.add(grad_out, diff, alpha=ctx.recon * scale)
        return grad_x, grad_q, None, None


class Codebook(HookPoint):
    """A learned codebook that replaces an activation with the sum (or mean) of its top-k most similar code vectors.

    It is a `HookPoint`: placed at a hook name of a HookedTransformer, hooks on that name see the quantized
    activation. Nested hook points expose its internals: `hook_input` (the activation before quantization)
    and `hook_codes` (the selected code ids, int64 `(..., k)` or `(..., groups, k)`). A hook that rewrites
    `hook_codes` changes the output to the sum (or mean) of the rewritten codes; an id of -1 means "no code".
    With `observe_only` set (see `codebooks_observed`) the codes are computed and exposed as usual but the
    activation passes through unchanged, so the model's outputs are those of the model without codebooks.

    `Codebook(dim, n_codes, **options)` builds `CodebookConfig(dim=dim, n_codes=n_codes, **options)`: the config
    dataclass is the single list of settings (documented there), and an unknown option is a TypeError.
    `device` and `dtype` place the weights.
    """

    def __init__(
        self,
        dim: int,
        n_codes: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **options,
    ):
        super().__init__()
        unknown = [key for key in options if key not in OPTIONS]
        if unknown:
            raise TypeError(
                f"Unknown Codebook option {unknown[0]!r}{did_you_mean(unknown[0], OPTIONS)} "
                f"The options are the fields of CodebookConfig: {list(OPTIONS)}."
            )
        self.cfg = CodebookConfig(dim=dim, n_codes=n_codes, **options)  # validates every setting
        groups, n_codes, dim = self.cfg.groups, self.cfg.n_codes, self.cfg.dim
        seed, init_std = self.cfg.seed, self.cfg.init_std
        generator = torch.Generator().manual_seed(seed)
        init = torch.randn(groups, n_codes, dim, generator=generator) * init_std
        self.weight = nn.Parameter(init.to(device=device, dtype=dtype))
        # Usage statistics; persistent so that a resumed run continues identically.
        self.register_buffer("counts", torch.zeros(groups, n_codes, dtype=torch.long, device=device))
        self.register_buffer("steps_since_used", torch.zeros(groups, n_codes, dtype=torch.long, device=device))
        self.register_buffer("train_steps", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("last_mse", torch.zeros((), device=device), persistent=False)
        if self.cfg.norm_affine:  # made only then, so that codebooks saved without them load unchanged
            # Parameters, so that weight fingerprints (code caches, checkpoints) cover them; frozen, since the search
            # gives them no gradient.
            ones, zeros = torch.ones(groups, dim, device=device, dtype=dtype), torch.zeros(groups, dim, device=device)
            self.norm_weight = nn.Parameter(ones, requires_grad=False)
            self.norm_bias = nn.Parameter(zeros.to(dtype=ones.dtype), requires_grad=False)
        self.bypass = False
        #: Compute and expose the codes (hook_codes, caches) but pass the activation through unchanged.
        self.observe_only = False
        #: Count code usage (`counts`) in every forward; off by default, so that analysis forwards change nothing.
        self.track_usage = False
        #: Set only by `train` (through `training_codebooks`) for its training steps: only then do forwards update
        #: the training statistics (`counts`, `steps_since_used`, `train_steps`) and replace dead codes. Train mode
        #: (`module.training`) alone does neither.
        self.in_train_loop = False
        self.check_finite = True
        #: Set only by `train` (a `training.distributed.CodebookStepSync`): sums a step's usage counts over its
        #: micro-batches and ranks, and keeps dead-code replacement identical on every rank. None: this forward alone.
        self.step_sync = None
        self.hook_input = HookPoint()
        self.hook_codes = HookPoint()

    @classmethod
    def from_config(cls, cfg: CodebookConfig, device=None, dtype=None) -> Codebook:
        """A codebook built from `cfg`, its parameters on `device` in `dtype`."""
        return cls(**dataclasses.asdict(cfg), device=device, dtype=dtype)

    @property
    def counting(self) -> bool:
        """Whether forwards update usage statistics now (`track_usage`, or inside `train`)."""
        return self.track_usage or self.in_train_loop

    # -- convenience views -------------------------------------------------------------------------------
    @property
    def grouped(self) -> bool:
        """Whether the codebook splits its input into `cfg.groups` groups, each with codes of its own."""
        return self.cfg.groups > 1

    @property
    def n_codes(self) -> int:
        """The number of codes (per group, when grouped)."""
        return self.cfg.n_codes

    @property
    def k(self) -> int:
        """The number of codes summed at each position (per group, when grouped)."""
        return self.cfg.k

    def extra_repr(self) -> str:
        """The settings shown in `repr(codebook)`."""
        c = self.cfg
        return (
            f"name={self.name!r}, dim={c.dim}, n_codes={c.n_codes}, k={c.k}, groups={c.groups}, "
            f"similarity={c.similarity!r}" + (f", combine={c.combine!r}" if c.combine != "sum" else "")
        )

    def __repr__(self) -> str:  # HookPoint overrides nn.Module's repr; restore the module tree view
        return nn.Module.__repr__(self)

    # -- the quantizer -----------------------------------------------------------------------------------
    def _as_groups(self, x: Tensor) -> Float[Tensor, "*batch groups dim"]:
        c = self.cfg
        if self.grouped:
            if x.dim() < 2 or x.shape[-2:] != (c.groups, c.dim):
                raise ValueError(
                    f"Codebook {self.name or ''} expects input (..., groups={c.groups}, dim={c.dim}) but got "
                    f"shape {tuple(x.shape)}; groups must match the number of heads and dim the head size."
                )
            return x
        if x.shape[-1] != c.dim:
            raise ValueError(
                f"Codebook {self.name or ''} expects input (..., dim={c.dim}) but got shape {tuple(x.shape)}; "
                f"build it with dim={x.shape[-1]} or feed it the activation it was made for."
            )
        return x.unsqueeze(-2)

    def scores(self, x: Float[Tensor, "*batch dim"]) -> Float[Tensor, "*batch n_codes"]:
        """The similarity of every code to `x` (`(..., groups, n_codes)` for grouped codebooks)."""
        xg = self._as_groups(x)
        s = self._scores(xg, exact=True)
        return s if self.grouped else s.squeeze(-2)

    #: On a CPU the top-k search goes through the scores in blocks of about this many elements (8 MB of float32):
    #: a block stays in cache instead of a whole (tokens, groups, n_codes) tensor going to memory. On CUDA blocks are
    #: sized by the free memory instead (`cbinterp.core.search.blocks.search_block_rows` states the rule).
    _chunk_scores = search_blocks.CPU_BLOCK_SCORES

    #: Whether k = 1 searches on a CPU in float32 take the fused kernel (`cbinterp.core.search.fused_search`): the same
    #: results, without the score matrix. Set it False on one codebook (benchmarks do) or on the class to switch it off.
    use_fused_search = True

    def _prepare(self, xg: Float[Tensor, "*batch groups dim"]) -> tuple[Tensor, Tensor, Tensor | None]:
        """The input and the codes as scored, and for euclidean similarity the per-code term |c|^2.

        The input is flattened to (n, groups, dim), the codes are (groups, n_codes, dim), and the term is None for
        other similarities: scores are x.c, or 2x.c - |c|^2 for euclidean."""
        c = self.cfg
        w = self.weight.detach()
        if c.normalize_input:
            xg = self._layer_norm(xg)
        if c.similarity == "inner_product":
            w = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        elif c.similarity == "cosine":
            w = F.normalize(w, dim=-1)
            xg = F.normalize(xg, dim=-1)
        # -|x-c|^2 = 2x.c - |c|^2 - |x|^2; |x|^2 does not change the ranking, so the top-k skips it.
        bias = w.pow(2).sum(-1) if c.similarity == "euclidean" else None
        return xg.reshape(-1, c.groups, c.dim), w, bias

    def _layer_norm(self, xg: Float[Tensor, "*batch groups dim"]) -> Float[Tensor, "*batch groups dim"]:
        """The input layer norm of every group (with its own scale and bias when `norm_affine`)."""
        c = self.cfg
        if not c.norm_affine:
            return F.layer_norm(xg, (c.dim,))
        # One F.layer_norm per group with that group's scale and bias: the same kernel codebook-features runs, so the
        # normalised inputs, and hence near-tied code choices, agree with theirs to the last bit.
        w, b = self.norm_weight.to(xg.dtype), self.norm_bias.to(xg.dtype)
        if c.groups == 1:
            return F.layer_norm(xg, (c.dim,), w[0], b[0])
        return torch.stack([F.layer_norm(xg[..., g, :], (c.dim,), w[g], b[g]) for g in range(c.groups)], dim=-2)

    @staticmethod
    def _block_scores(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        scores = x @ w.T
        return scores if bias is None else scores.mul_(2).sub_(bias)

    def _scores(
        self, xg: Float[Tensor, "*batch groups dim"], exact: bool = False
    ) -> Float[Tensor, "*batch groups n_codes"]:
        c = self.cfg
        lead = xg.shape[:-2]
        flat, w, bias = self._prepare(xg)
        dots = torch.stack(
            [self._block_scores(flat[:, g], w[g], None if bias is None else bias[g]) for g in range(c.groups)], dim=1
        )
        if exact and bias is not None:
            dots = -(flat.pow(2).sum(-1, keepdim=True) - dots).clamp_min(0).sqrt()
        return dots.reshape(*lead, c.groups, c.n_codes)

    def encode(self, x: Float[Tensor, "*batch dim"]) -> Int[Tensor, "*batch k"]:
        """The ids of the top-k codes for `x` (`(..., groups, k)` for grouped codebooks), best first."""
        with torch.no_grad():
            xg = self._as_groups(x)
            codes = self._encode(xg)
        return codes if self.grouped else codes.squeeze(-2)

    def _encode(self, xg: Tensor) -> Tensor:
        return self._search_fp32(xg)[0]

    def _search(self, xg: Float[Tensor, "*batch groups dim"]) -> tuple[Tensor, Tensor]:
        """The top-k code ids `(*batch, groups, k)` and the best score `(*batch, groups)` of every position.

        For k = 1 on a CPU in float32 the fused kernel of `cbinterp.core.search.fused_search` takes it (no score matrix;
        the same ids and scores; the rows it leaves, non-finite input, searched as below); otherwise `_search_matmul`.
        """
        c = self.cfg
        lead = xg.shape[:-2]
        flat, w, bias = self._prepare(xg)
        if c.k == 1 and self.use_fused_search and fused_search.applies(flat, w):
            ids, best = fused_search.nearest_code(flat, w, bias)
            return ids.reshape(*lead, c.groups, 1), best.reshape(*lead, c.groups)
        codes, best = self._search_matmul(flat, w, bias)
        return codes.transpose(0, 1).reshape(*lead, c.groups, c.k), best.transpose(0, 1).reshape(*lead, c.groups)

    def _search_matmul(self, flat: Tensor, w: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
        """`_search` on `_prepare`'s output the matmul way (`fused_search.matmul_search`), in blocks.

        On a CPU in blocks of about `_chunk_scores` scores, on CUDA in blocks sized by the free memory. Returns ids
        `(groups, n, k)` and best scores `(groups, n)`."""
        return fused_search.matmul_search(flat, w, bias, self.cfg.k, self._chunk_scores)

    def _search_fp32(self, xg: Tensor) -> tuple[Tensor, Tensor]:
        """`_search` in float32 under autocast: bf16 scores would tie and reorder close codes, changing the choice."""
        device = xg.device.type
        # Devices without autocast (meta, used to plan placement without memory) have nothing to turn off.
        if not torch.amp.is_autocast_available(device) or not torch.is_autocast_enabled(device):
            return self._search(xg)
        with torch.autocast(device, enabled=False):
            return self._search(xg.float())

    def decode(self, codes: Int[Tensor, "*batch k"], allow_empty: bool = True) -> Float[Tensor, "*batch dim"]:
        """The sum (with `combine="mean"`, the mean) of the code vectors named by `codes`; -1 contributes zero.

        An id of -1 is refused when not `allow_empty`. Ids are always checked: out of range is a ValueError, never
        another group's code."""
        if self.grouped:
            return self._decode(codes, True, allow_empty)
        return self._decode(codes.unsqueeze(-2), True, allow_empty).squeeze(-2)

    def _decode(
        self, codes: Int[Tensor, "*batch groups k"], check: bool, allow_empty: bool = True
    ) -> Float[Tensor, "*batch groups dim"]:
        c = self.cfg
        if codes.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"Code ids must be an integer tensor, got {codes.dtype}.")
        if codes.dim() < 2 or codes.shape[-2] != c.groups:
            raise ValueError(
                f"Codes for {self.name or 'this codebook'} need a groups axis of size {c.groups}, got shape "
                f"{tuple(codes.shape)}."
            )
        flat_weight = self.weight.reshape(c.groups * c.n_codes, c.dim)
        if not check and c.k == 1:  # the common case: one code per group, gathered without a k axis to sum
            ids = codes[..., 0]
            if c.groups > 1:
                ids = ids + torch.arange(c.groups, device=codes.device) * c.n_codes
            return F.embedding(ids, flat_weight)
        offsets = torch.arange(c.groups, device=codes.device).unsqueeze(-1) * c.n_codes
        if not check:
            return self._combine(F.embedding(codes + offsets, flat_weight).sum(-2), codes.shape[-1])
        lowest = -1 if allow_empty else 0
        out_of_range = (codes < lowest) | (codes >= c.n_codes)
        if bool(out_of_range.any()):
            bad = codes[out_of_range][0].item()
            raise ValueError(
                f"Code id {bad} is out of range for {self.name or 'this codebook'} with {c.n_codes} codes; "
                f"ids must be in [0, {c.n_codes - 1}]"
                + (", or -1 for no code." if allow_empty else " (allow_empty=False).")
            )
        present = codes >= 0
        vectors = F.embedding(torch.where(present, codes, 0) + offsets, flat_weight)
        return self._combine((vectors * present.unsqueeze(-1).to(vectors.dtype)).sum(-2), codes.shape[-1])

    def _combine(self, summed: Tensor, n: int) -> Tensor:
        """`summed`, the sum of `n` codes per position, as the output `combine` asks for."""
        return summed / n if self.cfg.combine == "mean" and n > 1 else summed

    def forward(self, x: Float[Tensor, "*batch dim"]) -> Float[Tensor, "*batch dim"]:
        """The sum (or mean) of the k most similar codes to `x` (per group), or `x` itself while bypassed."""
        conversion = self.hook_conversion
        if conversion is None:
            return self._quantize(x)
        # A TransformerBridge's hook point sees a flat tensor and shows hooks another shape (hook_z's heads): the
        # codebook quantizes what hooks see, as it does at the same name of a HookedTransformer.
        return conversion.revert(self._quantize(conversion.convert(x)))

    def _quantize(self, x: Float[Tensor, "*batch dim"]) -> Float[Tensor, "*batch dim"]:
        x = self.hook_input(x)
        if self.bypass:
            return x
        xg = self._as_groups(x)
        if self.in_train_loop and self.cfg.dead_after is not None:
            self._maybe_replace_dead(xg)
        with torch.no_grad():
            codes, best = self._search_fp32(xg)
            # A non-finite input has no code: its id is -1 and its output NaN, so the fault shows downstream. A NaN or
            # infinite input makes its best score non-finite, so the scores tell without another pass over the input.
            bad = ~torch.isfinite(best).unsqueeze(-1)  # (..., groups, 1)
            codes = codes.masked_fill(bad, NO_CODE)
        codes = self.hook_codes(codes if self.grouped else codes.squeeze(-2))
        codes_g = codes if self.grouped else codes.unsqueeze(-2)
        hooked = len(self.hook_codes._forward_hooks) > 0
        q = self._decode(codes_g if hooked else codes_g.clamp_min(0), check=hooked)
        # Asking the CPU whether any row is bad costs nothing; on an accelerator it would wait for the device.
        if q.device.type != "cpu" or torch.compiler.is_compiling() or bool(bad.any()):
            q = q.masked_fill(bad, float("nan"))
        q_out = q if self.grouped else q.squeeze(-2)
        if self.counting or self.training:  # train mode alone only checks for non-finite values
            self._update_usage(x, q_out, codes_g)
        if self.observe_only:
            return x  # observed, not applied: what follows sees the activation itself
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            recon = self.cfg.recon_weight
            commit = self.cfg.beta if self.cfg.loss == "vqvae" else 0.0
            return _StraightThrough.apply(x, q_out, recon, commit)
        return q_out

    @torch.no_grad()
    def _update_usage(self, x: Tensor, q: Tensor, codes: Tensor) -> None:
        c = self.cfg
        mse = F.mse_loss(x.detach().float(), q.detach().float())  # one fused pass, no temporaries
        self.last_mse.copy_(mse)
        # The check syncs the device and breaks a torch.compile graph. Compiled, or inside `train` on an accelerator
        # (where a per-forward sync would stall every step), `train`'s own loss check names the site from `last_mse`.
        if (
            (self.training or self.in_train_loop)
            and self.check_finite
            and (mse.device.type == "cpu" or not self.in_train_loop)
            and not torch.compiler.is_compiling()
            and not bool(torch.isfinite(mse))
        ):
            raise FloatingPointError(
                f"Non-finite activations or codes at codebook {self.name!r} (reconstruction MSE is {mse.item()}). "
                f"Lower the learning rate, clip gradients, or check the input at this site."
            )
        if not self.counting:
            return
        total = c.groups * c.n_codes
        flat = codes if c.groups == 1 else codes + torch.arange(c.groups, device=codes.device).unsqueeze(-1) * c.n_codes
        flat = torch.where(codes >= 0, flat, total).flatten()  # -1 (no code) goes to a spare bin, dropped
        batch_counts = torch.zeros(total + 1, dtype=torch.long, device=codes.device)
        batch_counts.scatter_add_(0, flat, torch.ones_like(flat))
        batch_counts = batch_counts[:total].view(c.groups, c.n_codes)
        if self.in_train_loop and self.step_sync is not None:
            batch_counts = self.step_sync.reduce_counts(self, batch_counts)  # the whole step's, over all ranks
            if batch_counts is None:  # an earlier micro-batch of the step: the step's last one updates
                return
        self.counts += batch_counts
        if self.in_train_loop:
            self.train_steps += 1
            self.steps_since_used += 1
            self.steps_since_used.masked_fill_(batch_counts > 0, 0)

    @torch.no_grad()
    def _maybe_replace_dead(self, xg: Tensor) -> None:
        c = self.cfg
        if int(self.train_steps) % c.dead_check_every != 0 or int(self.train_steps) == 0:
            return
        sync = self.step_sync
        if sync is not None and not sync.may_replace():  # once per optimizer step, not per micro-batch
            return
        rows = xg if sync is None else sync.replacement_rows(self, xg)
        if self.replace_dead_codes(rows, min_steps=c.dead_after) and sync is not None:
            sync.after_replace(self)

    @torch.no_grad()
    def replace_dead_codes(self, x: Float[Tensor, "*batch dim"], min_steps: int | None = None) -> int:
        """Re-initialise codes unused for `min_steps` training steps from random rows of `x` plus small noise.

        By default, the codes never used since the last reset. Returns how many codes were replaced."""
        c = self.cfg
        xg = x if x.shape[-2:] == (c.groups, c.dim) and self.grouped else self._as_groups(x)
        rows = xg.reshape(-1, c.groups, c.dim).detach()
        dead = self.steps_since_used >= min_steps if min_steps is not None else self.counts == 0
        replaced = 0
        for g in range(c.groups):
            idx = dead[g].nonzero().flatten()
            if idx.numel() == 0:
                continue
            pick = torch.randint(0, rows.shape[0], (idx.numel(),), device=rows.device)
            new = rows[pick, g].to(self.weight.dtype)
            noise = torch.randn_like(new) * new.std().clamp_min(1e-6) * c.replace_noise
            self.weight[g, idx] = new + noise
            self.steps_since_used[g, idx] = 0
            replaced += idx.numel()
        return replaced

    # -- statistics --------------------------------------------------------------------------------------
    # `counts` is for analysis: it grows only in forwards with `track_usage` on, or inside `train`, and only
    # `reset_usage()` zeroes it (never a progress display). Dead-code replacement reads `steps_since_used` and
    # `train_steps`, which only training steps change.
    def reset_usage(self) -> None:
        """Zero the firing counts (the dead-code step counters are kept)."""
        self.counts.zero_()

    def dead_codes(self, head: int | None = None) -> Tensor:
        """Ids of the codes that have not fired since the last `reset_usage()`, in `head` (no head when None).

        Counted as `cbinterp.dead_codes(cache, name, head)` counts a cache. `head` as in the cache queries: None or a
        missing value for no head; a codebook without heads also takes 0 (its only group)."""
        head = check_head(head, "this codebook", self.cfg.groups if self.grouped else None)
        counts = self.counts.sum(0) if head is None else self.counts[head]
        return torch.nonzero(counts == 0).flatten().cpu()

    @property
    def n_dead(self) -> int:
        """Number of code ids that have fired in no head since the last `reset_usage()` (see `dead_codes`)."""
        return int((self.counts.sum(0) == 0).sum())

    def usage(self) -> dict:
        """Firing counts, dead-code count (and per head for grouped codebooks) and last reconstruction MSE."""
        out = {
            "counts": self.counts.cpu() if self.grouped else self.counts[0].cpu(),
            "n_dead": self.n_dead,
            "mse": float(self.last_mse),
        }
        if self.grouped:
            out["n_dead_per_head"] = [int(n) for n in (self.counts == 0).sum(1)]
        return out

    # -- initialisation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def kmeans_init(self, x: Float[Tensor, "*batch dim"], iters: int = 10, seed: int = 0) -> None:
        """Set the codes to k-means centroids of the activations `x`.

        Lloyd iterations under the codebook's own similarity: each point goes to the code this codebook
        would select for it, and each code moves to the mean of its points, so the centroids reconstruct
        the activations the way the forward pass will use them. Codes left empty are re-seeded from random points.
        """
        c = self.cfg
        xg = self._as_groups(x).reshape(-1, c.groups, c.dim).to(self.weight.dtype)
        finite = torch.isfinite(xg).all(-1).all(-1)
        if not bool(finite.all()):
            dropped = int((~finite).sum())
            if dropped == xg.shape[0]:
                raise ValueError(f"kmeans_init of {self.name or 'a codebook'}: every input row is NaN or infinite.")
            warnings.warn(
                f"kmeans_init of {self.name or 'a codebook'}: left out {dropped} of {xg.shape[0]} input rows that "
                "hold NaN or infinite values.",
                stacklevel=2,
            )
            xg = xg[finite]
        n = xg.shape[0]
        generator = torch.Generator(device="cpu").manual_seed(seed)

        def random_points(count: int) -> Tensor:
            rows = torch.randint(0, n, (c.groups, count), generator=generator).to(xg.device)
            return xg[rows, torch.arange(c.groups, device=xg.device).unsqueeze(1)]

        self.weight.copy_(random_points(c.n_codes))
        offsets = torch.arange(c.groups, device=xg.device) * c.n_codes
        for _ in range(iters):
            assign = (self._encode(xg)[..., 0] + offsets).flatten()  # (n * groups,)
            sums = torch.zeros(c.groups * c.n_codes, c.dim, dtype=xg.dtype, device=xg.device)
            sums.index_add_(0, assign, xg.reshape(-1, c.dim))
            sizes = torch.bincount(assign, minlength=c.groups * c.n_codes).unsqueeze(1)
            centroids = torch.where(sizes > 0, sums / sizes.clamp_min(1), random_points(c.n_codes).reshape(-1, c.dim))
            self.weight.copy_(centroids.view(c.groups, c.n_codes, c.dim))
