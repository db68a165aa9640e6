"""Rotations: orthogonality, determinism per seed, the fast transform, refused sizes."""

from __future__ import annotations

import math

import pytest
import torch

from servelab.errors import KernelInputError
from servelab.kernels.turboquant.rotation import (
    fwht,
    make_rotation,
    sylvester_hadamard,
)

pytestmark = pytest.mark.kernels


@pytest.mark.parametrize(
    ("kind", "dim"),
    [
        ("haar", 128),
        ("haar", 96),
        ("haar", 7),
        ("randomized_hadamard", 128),
        ("randomized_hadamard", 64),
        ("fixed_hadamard", 128),
    ],
)
def test_rotation_is_orthogonal(kind: str, dim: int) -> None:
    r = make_rotation(kind, dim, 0 if kind != "fixed_hadamard" else None)  # type: ignore[arg-type]
    m = r.matrix
    eye = torch.eye(dim, dtype=torch.float64)
    torch.testing.assert_close(m @ m.T, eye, atol=1e-5, rtol=0)
    assert abs(abs(float(torch.linalg.det(m))) - 1.0) < 1e-4
    x = torch.randn(5, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(r.unrotate(r.rotate(x)), x, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", ["haar", "randomized_hadamard"])
def test_rotation_is_a_pure_function_of_the_seed(kind: str) -> None:
    a = make_rotation(kind, 128, 7)  # type: ignore[arg-type]
    b = make_rotation(kind, 128, 7)  # type: ignore[arg-type]
    c = make_rotation(kind, 128, 8)  # type: ignore[arg-type]
    assert torch.equal(a.matrix, b.matrix)
    assert not torch.equal(a.matrix, c.matrix)


def test_haar_sign_fix_makes_r_diagonal_positive() -> None:
    """With Q·sign(diag R), the QR of the Gaussian matrix is unique: R's diagonal is > 0."""
    g = torch.Generator().manual_seed(3)
    gauss = torch.randn((64, 64), generator=g, dtype=torch.float64)
    r = make_rotation("haar", 64, 3)
    upper = r.matrix.T @ gauss
    assert bool((torch.diagonal(upper) > 0).all())
    torch.testing.assert_close(torch.tril(upper, -1), torch.zeros_like(upper), atol=1e-10, rtol=0)


def test_haar_coordinates_follow_the_sphere_law() -> None:
    """A Haar rotation of one fixed vector: each coordinate has variance 1/d and 4th moment
    3/(d(d+2)) (the Beta law), which a biased rotation (e.g. the identity) would miss."""
    d, n = 32, 600
    e1 = torch.zeros(d, dtype=torch.float64)
    e1[0] = 1
    ys = torch.stack([make_rotation("haar", d, s).rotate(e1) for s in range(n)])
    var = float((ys**2).mean())
    m4 = float((ys**4).mean())
    assert var == pytest.approx(1 / d, rel=1e-9)  # exact: every rotated vector is unit
    assert m4 == pytest.approx(3 / (d * (d + 2)), rel=0.10)  # SE ≈ 2.4 %; identity: 10×


def test_fast_walsh_hadamard_matches_dense() -> None:
    x = torch.randn(3, 4, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(fwht(x), x @ sylvester_hadamard(128), atol=1e-10, rtol=0)
    for kind, seed in (("randomized_hadamard", 5), ("fixed_hadamard", None)):
        r = make_rotation(kind, 128, seed)  # type: ignore[arg-type]
        torch.testing.assert_close(r.fast_rotate(x), r.rotate(x), atol=1e-12, rtol=0)
    with pytest.raises(KernelInputError, match="no fast transform"):
        make_rotation("haar", 128, 0).fast_rotate(x)


@pytest.mark.parametrize("kind", ["randomized_hadamard", "fixed_hadamard"])
@pytest.mark.parametrize("dim", [96, 80, 3])
def test_hadamard_refuses_a_head_size_that_is_not_a_power_of_two(kind: str, dim: int) -> None:
    with pytest.raises(KernelInputError, match=rf"head size {dim} is not a power of two"):
        make_rotation(kind, dim, 0)  # type: ignore[arg-type]


def test_bad_rotation_arguments() -> None:
    with pytest.raises(KernelInputError, match="kind"):
        make_rotation("givens", 128, 0)  # type: ignore[arg-type]
    with pytest.raises(KernelInputError, match="seed"):
        make_rotation("haar", 128, None)
    with pytest.raises(KernelInputError, match="head size"):
        make_rotation("haar", 1, 0)
    r = make_rotation("haar", 16, 0)
    with pytest.raises(KernelInputError, match="head size 16"):
        r.rotate(torch.zeros(2, 8))


def test_sylvester_is_hadamard() -> None:
    h = sylvester_hadamard(32)
    torch.testing.assert_close(h @ h.T, 32 * torch.eye(32, dtype=torch.float64))
    assert math.isclose(float(h.abs().sum()), 32 * 32)
