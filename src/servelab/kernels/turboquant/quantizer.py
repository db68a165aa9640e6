"""TurboQuant_mse (Alg. 1) and TurboQuant_prod (Alg. 2) on row vectors.

Both keep ‖x‖ apart and quantize u = x/‖x‖. ``MSEQuantizer`` rotates, snaps every coordinate
to its Lloyd–Max centroid and rotates back; its inner products shrink by ≈ 1 − D_mse.
``ProdQuantizer`` spends b − 1 bits on the MSE stage and one bit per coordinate on a QJL sign
sketch of the residual, which makes ⟨y, x̃⟩ an unbiased estimate of ⟨y, x⟩.

Arithmetic runs in the input's floating type promoted to at least float32 (float64 inputs stay
float64, which the statistical tests use).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from servelab.errors import KernelInputError
from servelab.kernels.turboquant.codebook import (
    Codebook,
    Law,
    lloyd_max_codebook,
    validate_bits,
    validate_dim,
)
from servelab.kernels.turboquant.rotation import Rotation, RotationKind, make_rotation


def check_finite_float(x: torch.Tensor, dim: int, where: str) -> None:
    """Shape, dtype and finiteness of a batch of row vectors, checked before any work."""
    if not isinstance(x, torch.Tensor):
        raise KernelInputError(f"{where}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise KernelInputError(f"{where}: dtype {x.dtype} is not a floating type")
    if x.ndim == 0 or x.shape[-1] != dim:
        raise KernelInputError(
            f"{where}: last dimension of shape {tuple(x.shape)} must be the head size {dim}"
        )
    if x.numel() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise KernelInputError(
            f"{where}: input holds {bad} NaN or infinite value(s); TurboQuant cannot encode them "
            "(find where they come from upstream)"
        )


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class MSECode:
    """Codebook indices per coordinate (uint8) and one scale per vector.

    The scale is ‖x‖, or ‖x‖/‖c_idx‖ with norm correction (folding the correction into the
    stored number costs no bytes and lets attention skip a per-key norm).
    """

    indices: torch.Tensor
    scales: torch.Tensor


@dataclass(frozen=True, eq=False)
class MSEQuantizer:
    rotation: Rotation
    codebook: Codebook
    norm_correction: bool = False

    @classmethod
    def build(
        cls,
        dim: int,
        bits: int,
        rotation: RotationKind = "haar",
        seed: int | None = 0,
        law: Law = "exact",
        norm_correction: bool = False,
    ) -> MSEQuantizer:
        validate_dim(dim, "MSEQuantizer")
        validate_bits(bits, "MSEQuantizer")
        return cls(
            make_rotation(rotation, dim, seed), lloyd_max_codebook(dim, bits, law), norm_correction
        )

    @property
    def dim(self) -> int:
        return self.rotation.dim

    @property
    def bits(self) -> int:
        return self.codebook.bits

    def centroids(self, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.codebook.centroids, dtype=like.dtype, device=like.device)

    def quantize_rotated(self, y: torch.Tensor) -> torch.Tensor:
        """Index of the nearest centroid for each already-rotated unit-scale coordinate."""
        edges = torch.tensor(self.codebook.boundaries, dtype=y.dtype, device=y.device)
        return torch.bucketize(y, edges).to(torch.uint8)

    def quantize(self, x: torch.Tensor) -> MSECode:
        check_finite_float(x, self.dim, "MSEQuantizer.quantize")
        x = x.to(_work_dtype(x))
        norms = torch.linalg.vector_norm(x, dim=-1)
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        u = x / safe.unsqueeze(-1)
        idx = self.quantize_rotated(self.rotation.rotate(u))
        scales = norms
        if self.norm_correction:
            c = self.centroids(x)[idx.long()]
            scales = norms / torch.linalg.vector_norm(c, dim=-1)
        return MSECode(idx, scales)

    def dequantize(self, code: MSECode, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        work = torch.float64 if dtype == torch.float64 else torch.float32
        c = self.centroids(code.scales.to(work))[code.indices.long()]
        return (self.rotation.unrotate(c) * code.scales.to(work).unsqueeze(-1)).to(dtype)


@dataclass(frozen=True)
class ProdCode:
    """MSE stage at b − 1 bits (scale = ‖x‖), QJL signs of the residual, and γ = ‖r‖."""

    mse: MSECode
    signs: torch.Tensor  # uint8 0/1, 1 meaning sign(S·r) ≥ 0
    residual_norms: torch.Tensor


@dataclass(frozen=True, eq=False)
class ProdQuantizer:
    mse: MSEQuantizer
    projection: torch.Tensor  # S ∈ ℝ^{d×d}, i.i.d. N(0, 1), float64 on the CPU
    seed: int

    @classmethod
    def build(
        cls,
        dim: int,
        bits: int,
        rotation: RotationKind = "haar",
        seed: int = 0,
        law: Law = "exact",
    ) -> ProdQuantizer:
        validate_dim(dim, "ProdQuantizer")
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in (2, 3, 4, 5):
            raise KernelInputError(
                f"ProdQuantizer: bit width {bits!r} is not supported; the inner-product variant "
                "spends b − 1 bits on a 1–4-bit codebook plus one QJL bit, so b must be 2 to 5"
            )
        mse = MSEQuantizer.build(dim, bits - 1, rotation, seed, law, norm_correction=False)
        gen = torch.Generator(device="cpu")
        # A different stream from the rotation's, still a pure function of the seed.
        gen.manual_seed(seed + 0x5EED_0001)
        projection = torch.randn((dim, dim), generator=gen, dtype=torch.float64)
        return cls(mse, projection, seed)

    @property
    def dim(self) -> int:
        return self.mse.dim

    @property
    def bits(self) -> int:
        return self.mse.bits + 1

    def quantize(self, x: torch.Tensor) -> ProdCode:
        check_finite_float(x, self.dim, "ProdQuantizer.quantize")
        x = x.to(_work_dtype(x))
        code = self.mse.quantize(x)
        norms = code.scales
        safe = torch.where(norms > 0, norms, torch.ones_like(norms)).unsqueeze(-1)
        r = x / safe - self.mse.dequantize(MSECode(code.indices, torch.ones_like(norms)), x.dtype)
        proj = r @ self.projection.to(device=x.device, dtype=x.dtype).T
        return ProdCode(code, (proj >= 0).to(torch.uint8), torch.linalg.vector_norm(r, dim=-1))

    def dequantize_parts(
        self, code: ProdCode, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(MSE part, QJL part) of x̃, both already multiplied by ‖x‖."""
        work = torch.float64 if dtype == torch.float64 else torch.float32
        mse_part = self.mse.dequantize(code.mse, work)
        s = self.projection.to(device=code.signs.device, dtype=work)
        signs = code.signs.to(work) * 2.0 - 1.0
        gain = math.sqrt(math.pi / 2.0) / self.dim
        qjl = gain * (code.residual_norms.to(work) * code.mse.scales.to(work)).unsqueeze(-1)
        return mse_part.to(dtype), (qjl * (signs @ s)).to(dtype)

    def dequantize(self, code: ProdCode, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        mse_part, qjl_part = self.dequantize_parts(code, dtype)
        return mse_part + qjl_part
