"""Lloyd–Max codebooks for one coordinate of a randomly rotated unit vector.

After a Haar rotation every coordinate of a unit vector in dimension d has the density
f(t) = Γ(d/2) / (√π·Γ((d−1)/2)) · (1 − t²)^((d−3)/2) on [−1, 1] (t² ~ Beta(1/2, (d−1)/2));
for large d this tends to N(0, 1/d). Both laws have closed forms for the mass and the first
moment of an interval, so Lloyd's fixed point (centroid = conditional mean of its cell,
boundary = midpoint of its neighbours) is iterated on exact cell integrals in float64, not
on a sampled grid: the solution is exact up to the iteration tolerance.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from scipy import special

from servelab.errors import KernelInputError, KernelRuntimeError

Law = Literal["exact", "gaussian"]
LAWS: tuple[Law, ...] = ("exact", "gaussian")
SUPPORTED_BITS: tuple[int, ...] = (1, 2, 3, 4)

_TOL = 1e-14
_MAX_ITER = 100_000


@dataclass(frozen=True)
class Codebook:
    """A symmetric scalar codebook in raw coordinate units (multiply by √d for the table)."""

    dim: int
    bits: int
    law: Law
    centroids: tuple[float, ...]
    boundaries: tuple[float, ...]  # the 2^b − 1 inner cell edges
    iterations: int

    @property
    def levels(self) -> int:
        return len(self.centroids)

    def scaled_centroids(self) -> NDArray[np.float64]:
        """Centroids in units of 1/√d, as the paper prints them (docs/kernels-turboquant.md
        §2.2)."""
        return np.asarray(self.centroids) * math.sqrt(self.dim)

    def expected_mse(self) -> float:
        """Exact D_mse = E‖u − ũ‖² for a unit vector u under this law.

        Centroids are conditional means, so E(t − c)² summed over cells is E t² − Σ P_k c_k²,
        and E t² = 1/d for both laws; D_mse = d times that.
        """
        edges = np.concatenate(
            ([-_support(self.dim, self.law)], self.boundaries, [_support(self.dim, self.law)])
        )
        mass = np.diff(_cdf(edges, self.dim, self.law))
        c = np.asarray(self.centroids)
        return float(self.dim * (1.0 / self.dim - np.sum(mass * c * c)))


def validate_bits(bits: int, where: str) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise KernelInputError(
            f"{where}: bit width {bits!r} is not supported; TurboQuant codebooks exist for "
            f"{', '.join(map(str, SUPPORTED_BITS))} bits"
        )


def validate_dim(dim: int, where: str) -> None:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 3:
        raise KernelInputError(
            f"{where}: head size {dim!r} is not supported; the rotated-coordinate law needs an "
            "integer dimension of at least 3"
        )


def coordinate_density(t: NDArray[np.float64], dim: int, law: Law) -> NDArray[np.float64]:
    """Density of one coordinate of a rotated unit vector (for independent checks)."""
    t = np.asarray(t, dtype=np.float64)
    if law == "gaussian":
        return np.asarray(np.sqrt(dim / (2 * math.pi)) * np.exp(-0.5 * dim * t * t))
    log_c = special.gammaln(dim / 2) - 0.5 * math.log(math.pi) - special.gammaln((dim - 1) / 2)
    inside = np.abs(t) < 1.0
    out = np.zeros_like(t)
    out[inside] = np.exp(log_c + 0.5 * (dim - 3) * np.log1p(-(t[inside] ** 2)))
    return out


def _support(dim: int, law: Law) -> float:
    return 1.0 if law == "exact" else math.inf


def _cdf(x: NDArray[np.float64], dim: int, law: Law) -> NDArray[np.float64]:
    if law == "gaussian":
        return np.asarray(special.ndtr(x * math.sqrt(dim)))
    clipped = np.clip(x, -1.0, 1.0)
    half = 0.5 * special.betainc(0.5, 0.5 * (dim - 1), clipped * clipped)
    return np.asarray(0.5 + np.sign(clipped) * half)


def _first_moment_below(x: NDArray[np.float64], dim: int, law: Law) -> NDArray[np.float64]:
    """∫_{−∞}^{x} t f(t) dt, in closed form."""
    if law == "gaussian":
        return np.asarray(-np.exp(-0.5 * dim * x * x) / math.sqrt(2 * math.pi * dim))
    log_c = special.gammaln(dim / 2) - 0.5 * math.log(math.pi) - special.gammaln((dim - 1) / 2)
    clipped = np.clip(x, -1.0, 1.0)
    # d/dt [−(1 − t²)^((d−1)/2) / (d − 1)] = t (1 − t²)^((d−3)/2)
    return np.asarray(-math.exp(log_c) * (1.0 - clipped * clipped) ** (0.5 * (dim - 1)) / (dim - 1))


def _quantile(p: NDArray[np.float64], dim: int, law: Law) -> NDArray[np.float64]:
    if law == "gaussian":
        return np.asarray(special.ndtri(p) / math.sqrt(dim))
    q = np.abs(2.0 * p - 1.0)
    return np.asarray(np.sign(p - 0.5) * np.sqrt(special.betaincinv(0.5, 0.5 * (dim - 1), q)))


@functools.lru_cache(maxsize=64, typed=True)
def lloyd_max_codebook(dim: int, bits: int, law: Law = "exact") -> Codebook:
    """Solve the Lloyd–Max conditions for 2^bits levels (cached per (dim, bits, law)).

    >>> cb = lloyd_max_codebook(128, 1, "gaussian")
    >>> round(float(cb.scaled_centroids()[1]), 4)  # √(2/π)
    0.7979
    """
    validate_dim(dim, "lloyd_max_codebook")
    validate_bits(bits, "lloyd_max_codebook")
    if law not in LAWS:
        raise KernelInputError(f"lloyd_max_codebook: law {law!r} is not one of {LAWS}")
    levels = 1 << bits
    # Start at the quantiles of the cell midpoints: already close, so few iterations.
    c = _quantile((np.arange(levels) + 0.5) / levels, dim, law)
    lo, hi = -_support(dim, law), _support(dim, law)
    iterations = 0
    for iterations in range(1, _MAX_ITER + 1):  # noqa: B007  (the count is reported)
        inner = 0.5 * (c[1:] + c[:-1])
        edges = np.concatenate(([lo], inner, [hi]))
        mass = np.diff(_cdf(edges, dim, law))
        moment = np.diff(_first_moment_below(edges, dim, law))
        new = moment / mass
        new = 0.5 * (new - new[::-1])  # the law is symmetric; keep rounding from breaking it
        delta = float(np.max(np.abs(new - c)))
        c = new
        if delta < _TOL / math.sqrt(dim):
            break
    else:  # pragma: no cover - the iteration is a contraction for these log-concave laws
        raise KernelRuntimeError(
            f"Lloyd–Max did not converge for d={dim}, b={bits}, law={law}; report it with "
            "these three values"
        )
    inner = 0.5 * (c[1:] + c[:-1])
    return Codebook(
        dim=dim,
        bits=bits,
        law=law,
        centroids=tuple(float(v) for v in c),
        boundaries=tuple(float(v) for v in inner),
        iterations=iterations,
    )


def _cell_integrals(codebook: Codebook, law: Law, weight: str) -> NDArray[np.float64]:
    """Per cell ∫ g(t) f(t) dt under ``law`` by adaptive quadrature (independent of Lloyd)."""
    from scipy import integrate

    c = np.asarray(codebook.centroids)
    edges = [-_support(codebook.dim, law), *codebook.boundaries, _support(codebook.dim, law)]
    out = np.empty(len(c))
    for k in range(len(c)):
        ck = float(c[k])

        def g(t: float, ck: float = ck) -> float:
            dens = float(coordinate_density(np.asarray([t]), codebook.dim, law)[0])
            if weight == "sq_err":
                return (t - ck) ** 2 * dens
            if weight == "t_c":
                return t * ck * dens
            return ck * ck * dens

        lo, hi = edges[k], edges[k + 1]
        val, _ = integrate.quad(g, lo, hi, limit=200, epsabs=1e-15, epsrel=1e-12)
        out[k] = val
    return out


@functools.lru_cache(maxsize=64)
def distortion(codebook: Codebook, law: Law = "exact") -> float:
    """D_mse = E‖u − ũ‖² of ``codebook`` when the coordinates actually follow ``law``.

    vLLM solves its codebook for the Gaussian limit while rotated coordinates follow the
    exact law; this gives the distortion of that mismatch (quadrature, not the closed form).
    """
    return float(codebook.dim * np.sum(_cell_integrals(codebook, law, "sq_err")))


@functools.lru_cache(maxsize=64)
def norm_corrected_distortion(codebook: Codebook, law: Law = "exact") -> float:
    """E‖u − ĉ/‖ĉ‖‖² to first order, for a codebook whose centroid vector is renormalized.

    With A = E⟨u, ĉ⟩ = d·Σ_k c_k·∫_k t f and B = E‖ĉ‖² = d·Σ_k c_k²·P_k (sums of d i.i.d.
    terms, closed-form cell integrals), E⟨u, ĉ⟩/‖ĉ‖ ≈ A/√B, so the error is 2 − 2·A/√B;
    the neglected term is O(1/d).
    """
    edges = np.concatenate(
        ([-_support(codebook.dim, law)], codebook.boundaries, [_support(codebook.dim, law)])
    )
    mass = np.diff(_cdf(edges, codebook.dim, law))
    moment = np.diff(_first_moment_below(edges, codebook.dim, law))
    c = np.asarray(codebook.centroids)
    a = codebook.dim * float(np.sum(c * moment))
    b = codebook.dim * float(np.sum(c * c * mass))
    return 2.0 - 2.0 * a / math.sqrt(b)
