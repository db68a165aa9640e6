"""What a fused TurboQuant decode call is configured with: the launch knobs
(:class:`LaunchConfig`) and the per-(codec, device) constants (:class:`DecodeConstants`).

Kept apart from the dispatch (``fused_decode``) so that each backend module can read them
without importing the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from servelab.kernels.turboquant.kvcache import KVCodec

LOG2E = 1.4426950408889634
BACKENDS = ("auto", "cuda", "triton")


@dataclass(frozen=True, eq=False)
class DecodeConstants:
    """Per-(codec, device) tensors the fused path needs, built once, not per decode step."""

    rotation_t: torch.Tensor | None  # Πᵀ, float32 on the device
    centroids: torch.Tensor | None  # √d·c_k as fp16, then its fp16 rounding residue

    @classmethod
    def build(cls, codec: KVCodec, device: torch.device) -> DecodeConstants:
        if codec.key_quantizer is None:
            return cls(None, None)
        rot = codec.key_quantizer.rotation.matrix.T.to(device=device, dtype=torch.float32)
        table = codec.centroid_table(torch.device("cpu"))
        hi = table.to(torch.float16)
        lo = (table - hi.float()).to(torch.float16)
        return cls(rot.contiguous(), torch.cat((hi, lo)).contiguous().to(device))


@dataclass(frozen=True)
class LaunchConfig:
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    num_splits: int | None = None  # None: about four programs per multiprocessor
    precise_table: bool = True  # add the fp16 residue of the centroid table (one more MMA)
    # The generic kernel where the word kernel (fused_words_triton) would serve: 4-bit keys
    # and values, and the dense baseline.
    generic: bool = False
    split_operands: bool = True  # word kernel: q and p·scale as fp16 hi + lo (2× the MMAs)
    # 4-bit keys and values: "auto" takes the CUDA kernel (csrc/tq4_decode.cu) where it runs
    # and the Triton word kernel elsewhere; "cuda" insists (an error says why it cannot run);
    # "triton" never builds it. Its own knob: warps per CTA (8 or 16); num_splits and
    # precise_table apply to it too.
    backend: str = "auto"
    cuda_warps: int = 16
    # CUDA kernel at 16 warps: the centroid table's rows 256 bytes apart instead of 128, so a
    # lookup's address is one byte permute (32 fewer instructions a 16-token tile; 32 KB more
    # shared memory, which 8 warps' two CTAs a multiprocessor do not have).
    cuda_wide_table: bool = False
    # CUDA kernel: programmatic dependent launch on sm_90+ (the next call's CTAs start while
    # this one finishes; each waits for its predecessor before reading anything).
    cuda_pdl: bool = True
