"""Random rotations Π for TurboQuant, applied to row vectors as y = x·Πᵀ.

- ``haar``: a dense Haar-random orthogonal matrix (QR of an i.i.d. Gaussian matrix, columns
  multiplied by sign(diag R) so that the law is exactly Haar and the result is a pure function
  of the seed). This is what the paper analyses.
- ``randomized_hadamard``: Π = H·diag(s)/√d with random signs s. O(d log d) through a fast
  Walsh–Hadamard transform; its coordinates are not Haar-distributed on every input (a basis
  vector lands on ±1/√d everywhere: at b = 2 its error is 0.255 against 0.117 under Haar,
  docs/kernels-turboquant.md §2.6).
- ``fixed_hadamard``: H/√d with no random signs, as vLLM's presets use. It exists so a test can
  show how it fails: a row of H rotates to a one-hot vector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from servelab.errors import KernelInputError

RotationKind = Literal["haar", "randomized_hadamard", "fixed_hadamard"]
ROTATION_KINDS: tuple[RotationKind, ...] = ("haar", "randomized_hadamard", "fixed_hadamard")


@dataclass(frozen=True, eq=False)
class Rotation:
    """An orthogonal d×d matrix Π held in float64 on the CPU."""

    kind: RotationKind
    dim: int
    seed: int | None
    matrix: torch.Tensor
    signs: torch.Tensor | None  # the random signs of a randomized Hadamard transform

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """y = Π·x for each row x (last dimension = dim)."""
        _check_last_dim(x, self.dim, "Rotation.rotate")
        return x @ self.matrix.to(device=x.device, dtype=x.dtype).T

    def unrotate(self, y: torch.Tensor) -> torch.Tensor:
        """x = Πᵀ·y for each row y."""
        _check_last_dim(y, self.dim, "Rotation.unrotate")
        return y @ self.matrix.to(device=y.device, dtype=y.dtype)

    def fast_rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Π·x through the fast Walsh–Hadamard transform (Hadamard kinds only)."""
        _check_last_dim(x, self.dim, "Rotation.fast_rotate")
        if self.kind == "haar":
            raise KernelInputError(
                "Rotation.fast_rotate: a Haar rotation has no fast transform; use rotate()"
            )
        if self.signs is not None:
            x = x * self.signs.to(device=x.device, dtype=x.dtype)
        return fwht(x) / math.sqrt(self.dim)


def _check_last_dim(x: torch.Tensor, dim: int, where: str) -> None:
    if x.ndim == 0 or x.shape[-1] != dim:
        raise KernelInputError(
            f"{where}: last dimension of input with shape {tuple(x.shape)} must be the head size "
            f"{dim}"
        )


def is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def sylvester_hadamard(dim: int) -> torch.Tensor:
    """The ±1 Sylvester Hadamard matrix of order dim (a power of two), float64."""
    if not is_power_of_two(dim):
        raise KernelInputError(
            f"sylvester_hadamard: head size {dim} is not a power of two; a Hadamard rotation "
            "needs one (use rotation='haar' for other sizes)"
        )
    h = torch.ones((1, 1), dtype=torch.float64)
    while h.shape[0] < dim:
        h = torch.cat((torch.cat((h, h), dim=1), torch.cat((h, -h), dim=1)), dim=0)
    return h


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized fast Walsh–Hadamard transform along the last dimension (x·H, H symmetric)."""
    n = x.shape[-1]
    if not is_power_of_two(n):
        raise KernelInputError(f"fwht: last dimension {n} is not a power of two")
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.reshape(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(*lead, n)


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def make_rotation(kind: RotationKind, dim: int, seed: int | None = 0) -> Rotation:
    """Build a rotation; the same (kind, dim, seed) always gives the same matrix, bit for bit."""
    if kind not in ROTATION_KINDS:
        raise KernelInputError(
            f"make_rotation: rotation kind {kind!r} is not one of {ROTATION_KINDS}"
        )
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
        raise KernelInputError(f"make_rotation: head size {dim!r} must be an integer ≥ 2")
    if kind == "fixed_hadamard":
        return Rotation(kind, dim, None, sylvester_hadamard(dim) / math.sqrt(dim), None)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise KernelInputError(
            f"make_rotation: a {kind} rotation needs an integer seed, got {seed!r}"
        )
    gen = _generator(seed)
    if kind == "randomized_hadamard":
        h = sylvester_hadamard(dim)
        signs = torch.randint(0, 2, (dim,), generator=gen, dtype=torch.int64).to(torch.float64)
        signs = 2.0 * signs - 1.0
        return Rotation(kind, dim, seed, h * signs / math.sqrt(dim), signs)
    gauss = torch.randn((dim, dim), generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    d = torch.sign(torch.diagonal(r))
    d = torch.where(d == 0, torch.ones_like(d), d)
    return Rotation(kind, dim, seed, q * d, None)
