"""Direct re-computations the codebook tests compare against (test_codebook_search.py, test_codebook_state.py)."""

from __future__ import annotations

import torch


def direct_scores(x: torch.Tensor, weight: torch.Tensor, similarity: str, normalize_input: bool) -> torch.Tensor:
    """Similarity of every code to x, computed from the definitions. x: (n, groups, dim) -> (n, groups, n_codes)."""
    x = x.double()
    w = weight.detach().double()  # (groups, n_codes, dim)
    if normalize_input:  # layer norm without affine parameters, eps as in torch's default
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, unbiased=False, keepdim=True)
        x = (x - mean) / torch.sqrt(var + 1e-5)
    if similarity == "inner_product":  # x . c / |c|
        return torch.einsum("ngd,gcd->ngc", x, w) / w.norm(dim=-1)
    if similarity == "cosine":
        return torch.einsum("ngd,gcd->ngc", x, w) / (x.norm(dim=-1, keepdim=True) * w.norm(dim=-1))
    assert similarity == "euclidean"  # negative distance
    return -((x.unsqueeze(-2) - w.unsqueeze(0)) ** 2).sum(-1).sqrt()


def sum_of_codes(weight: torch.Tensor, codes_g: torch.Tensor) -> torch.Tensor:
    """sum_j weight[g, codes[..., g, j]] with plain Python loops (codes_g: (n, groups, k))."""
    n, groups, k = codes_g.shape
    out = torch.zeros(n, groups, weight.shape[-1], dtype=weight.dtype)
    for i in range(n):
        for g in range(groups):
            for j in range(k):
                out[i, g] += weight[g, codes_g[i, g, j]]
    return out


def as_groups(t: torch.Tensor, grouped: bool) -> torch.Tensor:
    return t if grouped else t.unsqueeze(-2)


def random_input(n: int, groups: int, dim: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (n, groups, dim) if groups > 1 else (n, dim)
    return torch.randn(shape, generator=g) * scale
