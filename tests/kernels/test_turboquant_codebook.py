"""Lloyd–Max codebooks against docs/kernels-turboquant.md §2.2–2.3 and an independent quadrature.

Every "§2.x" below is a section of docs/kernels-turboquant.md.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate

from servelab.errors import KernelInputError
from servelab.kernels.turboquant.codebook import (
    Law,
    coordinate_density,
    distortion,
    lloyd_max_codebook,
)

pytestmark = pytest.mark.kernels

# √d·c_k, positive half (§2.2).
TABLE = {
    ("gaussian", 1): (0.7979,),
    ("gaussian", 2): (0.4528, 1.5104),
    ("gaussian", 3): (0.2451, 0.7560, 1.3439, 2.1519),
    ("gaussian", 4): (0.1284, 0.3880, 0.6568, 0.9423, 1.2562, 1.6180, 2.0690, 2.7326),
    ("exact", 1): (0.7994,),
    ("exact", 2): (0.4525, 1.5052),
    ("exact", 3): (0.2444, 0.7533, 1.3366, 2.1315),
    ("exact", 4): (0.1279, 0.3864, 0.6536, 0.9371, 1.2478, 1.6043, 2.0459, 2.6889),
}
# Exact D_mse (§2.3): Gaussian limit, d = 128, d = 64, d = 256.
D_GAUSS = {1: 1 - 2 / math.pi, 2: 0.11748, 3: 0.03455, 4: 0.00950}
D_EXACT = {
    128: {1: 0.36089, 2: 0.11600, 3: 0.03397, 4: 0.00931},
    64: {1: 0.35839, 2: 0.11453, 3: 0.03339, 4: 0.00913},
    256: {1: 0.36214, 2: 0.11674, 3: 0.03426, 4: 0.00941},
}


@pytest.mark.parametrize(("law", "bits"), sorted(TABLE))
def test_centroids_match_reference_table(law: Law, bits: int) -> None:
    cb = lloyd_max_codebook(128, bits, law)
    c = cb.scaled_centroids()
    half = c[len(c) // 2 :]
    # The table prints 4 decimals: 1e-3 (§2.8) is loose enough for rounding, tight for a bug.
    np.testing.assert_allclose(half, TABLE[(law, bits)], atol=1e-3, rtol=0)


@pytest.mark.parametrize("law", ["exact", "gaussian"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_codebook_structure(law: Law, bits: int) -> None:
    cb = lloyd_max_codebook(128, bits, law)
    c = np.asarray(cb.centroids)
    assert len(c) == 2**bits
    assert np.all(np.diff(c) > 0), "centroids must be strictly sorted"
    np.testing.assert_allclose(c, -c[::-1], atol=1e-5 / math.sqrt(128), rtol=0)
    np.testing.assert_allclose(cb.boundaries, 0.5 * (c[1:] + c[:-1]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("law", ["exact", "gaussian"])
@pytest.mark.parametrize("bits", [2, 4])
def test_centroids_are_conditional_means_by_quadrature(law: Law, bits: int) -> None:
    """The Lloyd fixed point, re-derived with scipy.integrate.quad on the density itself."""
    d = 128
    cb = lloyd_max_codebook(d, bits, law)
    support = 1.0 if law == "exact" else math.inf
    edges = [-support, *cb.boundaries, support]

    def f(t: float) -> float:
        return float(coordinate_density(np.asarray([t]), d, law)[0])

    total, _ = integrate.quad(f, -support, support)
    assert total == pytest.approx(1.0, abs=1e-9), "density must integrate to 1"
    for k, ck in enumerate(cb.centroids):
        mass, _ = integrate.quad(f, edges[k], edges[k + 1], epsabs=1e-14)
        moment, _ = integrate.quad(lambda t: t * f(t), edges[k], edges[k + 1], epsabs=1e-15)
        assert moment / mass == pytest.approx(ck, abs=1e-7 / math.sqrt(d))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_expected_distortion_matches_reference(bits: int) -> None:
    for d, table in D_EXACT.items():
        cb = lloyd_max_codebook(d, bits, "exact")
        assert cb.expected_mse() == pytest.approx(table[bits], abs=1.5e-5)
    gauss = lloyd_max_codebook(128, bits, "gaussian")
    assert gauss.expected_mse() == pytest.approx(D_GAUSS[bits], abs=1.5e-5)
    # Closed-form cell integrals and adaptive quadrature agree.
    assert distortion(gauss, "gaussian") == pytest.approx(gauss.expected_mse(), rel=1e-6)
    # Paper bounds: 4^−b ≤ D ≤ (√3·π/2)·4^−b.
    assert 4.0**-bits <= table[bits] <= math.sqrt(3) * math.pi / 2 * 4.0**-bits


def test_gaussian_codebook_is_worse_under_the_exact_law() -> None:
    """vLLM's Gaussian codebook is optimal for another law, so it must lose, if only a little."""
    exact = lloyd_max_codebook(128, 3, "exact")
    gauss = lloyd_max_codebook(128, 3, "gaussian")
    mismatch = distortion(gauss, "exact")
    assert mismatch > exact.expected_mse()
    assert mismatch < exact.expected_mse() * 1.01


def test_codebook_is_cached_and_deterministic() -> None:
    a = lloyd_max_codebook(96, 3, "exact")
    assert lloyd_max_codebook(96, 3, "exact") is a
    lloyd_max_codebook.cache_clear()
    b = lloyd_max_codebook(96, 3, "exact")
    assert b is not a and b == a


@pytest.mark.parametrize("bits", [0, 5, 8, -1, 2.0, True])
def test_unsupported_bit_width_is_refused(bits: object) -> None:
    with pytest.raises(KernelInputError, match="bit width"):
        # Deliberately a bad bit width; lru_cache's wrapper does not type-check the call.
        lloyd_max_codebook(128, bits, "exact")


def test_bad_dimension_and_law_are_refused() -> None:
    with pytest.raises(KernelInputError, match="head size"):
        lloyd_max_codebook(2, 2, "exact")
    with pytest.raises(KernelInputError, match="law"):
        # Deliberately an unknown law; lru_cache's wrapper does not type-check the call.
        lloyd_max_codebook(128, 2, "laplace")
