"""GreBsmo (Zhou & Tao 2013): greedy bilateral smoothing split of a matrix into low rank + sparse.

`X ≈ U·V + S`: the rank grows `step` at a time (new directions are the top singular vectors
of the current residual); at each rank, U and V are refit by bilateral least squares and S is
the soft-thresholded remainder. DSEE uses the largest |S| of a pretrained weight as the
support of its sparse update.
"""

from __future__ import annotations

import torch


def _robust_threshold(residual: torch.Tensor, factor: float) -> float:
    # Median absolute deviation: outliers (the sparse part) barely move it.
    median = residual.median()
    return float(factor * 1.4826 * (residual - median).abs().median())


def grebsmo(
    X: torch.Tensor,
    rank: int,
    *,
    step: int = 1,
    threshold: float | None = None,
    mad_factor: float = 3.0,
    inner_iters: int = 10,
    tol: float = 1e-7,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (L, S) with rank(L) <= rank and S sparse, X ≈ L + S.

    `threshold` is the soft threshold for S; by default it is `mad_factor` robust standard
    deviations of the current residual, so it adapts as the low-rank part explains more.
    """
    X64 = X.detach().to(torch.float64)
    m, n = X64.shape
    U = X64.new_zeros(m, 0)
    V = X64.new_zeros(0, n)
    S = torch.zeros_like(X64)
    L = torch.zeros_like(X64)
    while U.shape[1] < rank:
        u, s, vh = torch.linalg.svd(X64 - S - L, full_matrices=False)
        grow = min(step, rank - U.shape[1])
        U = torch.cat([U, u[:, :grow] * s[:grow]], dim=1)
        V = torch.cat([V, vh[:grow]], dim=0)
        previous = float("inf")
        for _ in range(inner_iters):
            D = X64 - S
            U = D @ V.T @ torch.linalg.pinv(V @ V.T)
            V = torch.linalg.pinv(U.T @ U) @ U.T @ D
            L = U @ V
            residual = X64 - L
            lam = threshold if threshold is not None else _robust_threshold(residual, mad_factor)
            S = torch.sign(residual) * (residual.abs() - lam).clamp(min=0)
            error = float(torch.linalg.norm(X64 - L - S) / torch.linalg.norm(X64).clamp(min=1e-30))
            if abs(previous - error) < tol:
                break
            previous = error
    return L.to(X.dtype), S.to(X.dtype)


def sparse_support(X: torch.Tensor, k: int, rank: int = 8) -> torch.Tensor:
    """Flat row-major indices of the k largest |S| of X's GreBsmo split, sorted."""
    _, S = grebsmo(X, rank)
    return torch.topk(S.abs().reshape(-1), k).indices.sort().values
