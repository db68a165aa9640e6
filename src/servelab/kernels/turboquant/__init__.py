"""TurboQuant KV-cache compression (arXiv 2504.19874): codebooks, rotations, quantizers,
vLLM preset emulation, and decode attention over the packed cache.

The fused decode kernels (``fused_decode`` and its backends ``fused_*``) need Triton and are
not imported here, so the rest works where Triton is absent.
"""

from servelab.kernels.turboquant.attention import (
    reference_decode_attention,
    unfused_decode_attention,
)
from servelab.kernels.turboquant.codebook import (
    Codebook,
    distortion,
    lloyd_max_codebook,
    norm_corrected_distortion,
)
from servelab.kernels.turboquant.kvcache import KVCodec, PackedKVCache
from servelab.kernels.turboquant.packing import pack_bits, packed_bytes, unpack_bits
from servelab.kernels.turboquant.presets import PRESETS, KVPreset, get_preset
from servelab.kernels.turboquant.quantizer import MSEQuantizer, ProdQuantizer
from servelab.kernels.turboquant.rotation import Rotation, fwht, make_rotation

__all__ = [
    "PRESETS",
    "Codebook",
    "KVCodec",
    "KVPreset",
    "MSEQuantizer",
    "PackedKVCache",
    "ProdQuantizer",
    "Rotation",
    "distortion",
    "fwht",
    "get_preset",
    "lloyd_max_codebook",
    "make_rotation",
    "norm_corrected_distortion",
    "pack_bits",
    "packed_bytes",
    "reference_decode_attention",
    "unfused_decode_attention",
    "unpack_bits",
]
