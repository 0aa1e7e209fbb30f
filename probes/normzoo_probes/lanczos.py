"""Lanczos iteration with full reorthogonalization: the top eigenvalues of a symmetric operator from products alone.

k products Av build an orthonormal basis Q of the Krylov space span{q, Aq, ..., A^(k-1) q} in which A is the
tridiagonal T = QᵀAQ; the eigenvalues of T (Ritz values) approach A's extreme eigenvalues far faster than power
iteration does (Golub & Van Loan, Matrix Computations, §10.1; Saad, Numerical Methods for Large Eigenvalue
Problems, ch. 6). Unlike power iteration it finds the *algebraically* largest eigenvalues, so a large negative
eigenvalue never hides λ_max.

Each new vector is orthogonalized against every earlier one, twice ("twice is enough", Parlett's rule for
classical Gram–Schmidt): in floating point the plain three-term recurrence loses orthogonality as soon as a Ritz
value converges and then reports copies of it. With k ≤ ~30 products that costs k vectors of memory and k dot
products per step, nothing next to one Hessian-vector product.

A Ritz pair (θ, y = Qs) has residual ‖Ay − θy‖ = β_k |s_k| (β_k the next off-diagonal, s_k the last entry of s),
which bounds |λ − θ| for some eigenvalue λ: convergence is judged on that residual, relative to the largest |θ|.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LanczosResult:
    """``eigenvalues``: the top Ritz values, largest first; ``vector``: the unit Ritz vector of the largest one;
    ``residuals``: ‖Ay − θy‖ of each; ``iterations``: products used; ``converged``: every residual ≤ tol·max|θ|,
    or the Krylov space became invariant (then the Ritz values are exact eigenvalues)."""

    eigenvalues: list[float]
    vector: torch.Tensor
    residuals: list[float]
    iterations: int
    converged: bool


def lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, *, iters: int, top: int = 1,
            tol: float = 1e-3) -> LanczosResult:
    """The ``top`` largest eigenvalues of the symmetric operator ``matvec`` (flat vectors), from ``start``.

    Stops after ``iters`` products, or as soon as the top Ritz pairs have converged (never before ``top``
    products, unless the Krylov space is exhausted sooner: an operator of rank < top, or a start vector inside
    an invariant subspace). The tridiagonal is solved in float64 on the CPU; the vectors stay in
    ``start``'s dtype and device.
    """
    n = start.numel()
    iters = min(iters, n)
    basis = torch.empty(iters, n, dtype=start.dtype, device=start.device)
    basis[0] = start / torch.linalg.vector_norm(start)
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(iters):
        w = matvec(basis[j])
        alphas.append(float(torch.dot(w, basis[j])))
        done = basis[:j + 1]
        for _ in range(2):
            w = w - done.T @ (done @ w)
        beta = float(torch.linalg.vector_norm(w))
        thetas, vectors = _ritz(alphas, betas)
        k = min(top, j + 1)
        order = torch.argsort(thetas, descending=True)[:k]
        residuals = (beta * vectors[-1, order].abs()).tolist()
        scale = float(thetas.abs().max())
        # An invariant Krylov space (β ≈ 0 relative to the spectrum) ends the iteration: nothing new can be found.
        exhausted = beta <= 1e-12 * max(scale, 1e-300) or j + 1 == n
        converged = exhausted or (k == top and all(r <= tol * scale for r in residuals))
        if converged or j + 1 == iters:
            ritz = done.T @ vectors[:, order[0]].to(start.dtype).to(start.device)
            return LanczosResult(eigenvalues=thetas[order].tolist(), vector=ritz / torch.linalg.vector_norm(ritz),
                                 residuals=residuals, iterations=j + 1, converged=converged)
        betas.append(beta)
        basis[j + 1] = w / beta
    raise AssertionError("unreachable: the loop returns at its last iteration")


def _ritz(alphas: list[float], betas: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and eigenvectors (columns) of the symmetric tridiagonal with diagonal α and off-diagonal β."""
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigh(t)


def flat_start(previous: torch.Tensor | None, like: torch.Tensor, gen: torch.Generator,
               noise: float) -> tuple[torch.Tensor, bool]:
    """A start vector: the previous top Ritz vector plus ``noise`` × a random unit vector (warm), or a random
    vector (cold, also when the previous one has another size). Returns (vector, warm?).

    The random part keeps every direction in the Krylov space: started exactly on an eigenvector, Lanczos would
    stop after one product (an invariant space) and could neither see a new top eigenvalue that overtook the old
    one nor find the next ``top - 1``.
    """
    random = torch.randn(like.numel(), generator=gen, device=like.device, dtype=like.dtype)
    if previous is None or previous.numel() != like.numel() or not math.isfinite(noise):
        return random, False
    return previous.to(like.device, like.dtype) + noise * random / torch.linalg.vector_norm(random), True
