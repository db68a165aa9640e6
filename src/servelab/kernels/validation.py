"""Argument checks shared by the kernels: every failure is a KernelInputError raised before launch.

Messages name the argument, what it was, and the form that is expected, so a caller can fix
the call without reading the kernel.
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable, Sequence

import torch

from servelab.errors import KernelInputError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def describe(t: torch.Tensor) -> str:
    """Short label of a tensor for error messages: shape, dtype, device."""
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def require_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise KernelInputError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def require_ndim(name: str, t: torch.Tensor, ndim: int, form: str) -> None:
    if t.dim() != ndim:
        raise KernelInputError(f"{name} must be {ndim}-D {form}; got {describe(t)}")


def require_dtype(
    name: str, t: torch.Tensor, allowed: Sequence[torch.dtype], form: str = ""
) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        extra = f" ({form})" if form else ""
        raise KernelInputError(f"{name} must have dtype in [{names}]{extra}; got {describe(t)}")


def require_same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise KernelInputError(
            f"{name} must have the dtype of {ref_name} ({ref.dtype}); got {describe(t)}"
        )


def require_device(name: str, t: torch.Tensor, device: torch.device, why: str = "") -> None:
    if not same_device(t.device, device):
        extra = f" ({why})" if why else ""
        raise KernelInputError(f"{name} must be on device {device}{extra}; got {describe(t)}")


def require_shape(name: str, t: torch.Tensor, shape: Sequence[int], form: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise KernelInputError(f"{name} must have shape {tuple(shape)} {form}; got {describe(t)}")


def require_inner_contiguous(name: str, t: torch.Tensor, inner_dims: int, form: str) -> None:
    """The last ``inner_dims`` dimensions must be laid out densely (row-major), any outer stride."""
    expected = 1
    for dim in range(t.dim() - 1, t.dim() - 1 - inner_dims, -1):
        if t.shape[dim] != 1 and t.stride(dim) != expected:
            raise KernelInputError(
                f"{name} must be contiguous in its last {inner_dims} dimensions ({form}); "
                f"got strides {tuple(t.stride())} for {describe(t)}. "
                "Pass a tensor whose blocks are dense (e.g. .contiguous())"
            )
        expected *= t.shape[dim]


def require_int(name: str, value: object, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise KernelInputError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise KernelInputError(f"{name} must be >= {minimum}, got {value}")
    return value


def same_device(a: torch.device, b: torch.device) -> bool:
    """Device equality that treats ``cuda`` and ``cuda:<current>`` as the same device."""
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        return True
    return a.index == b.index


def require_optional_positive(name: str, value: float | int | None) -> None:
    if value is not None and not value > 0:
        raise KernelInputError(f"{name} must be None or > 0, got {value!r}")


def check_block_ids(name: str, table: torch.Tensor, num_blocks: int, needed: int) -> None:
    """A host integer table holding at least ``needed`` ids, each in ``[0, num_blocks)``."""
    if not isinstance(table, torch.Tensor):
        raise KernelInputError(f"{name} must be a torch.Tensor of block ids")
    require_ndim(name, table, 1, "[num_blocks_used] of physical block ids")
    require_dtype(name, table, (torch.int32, torch.int64), "block ids")
    if table.device.type != "cpu":
        raise KernelInputError(
            f"{name} must be a host (cpu) tensor: block ids are planned on the host; "
            f"got {describe(table)}"
        )
    if table.numel() < needed:
        raise KernelInputError(
            f"{name} holds {table.numel()} block ids but the length needs {needed}"
        )
    if needed:
        lo_t, hi_t = torch.aminmax(table[:needed])  # one pass: this check runs every call
        lo, hi = int(lo_t), int(hi_t)
        if lo < 0 or hi >= num_blocks:
            raise KernelInputError(
                f"{name} has block ids in [{lo}, {hi}] but the cache holds blocks "
                f"[0, {num_blocks - 1}]"
            )


def check_cache_tensor(name: str, t: object) -> torch.Tensor:
    """A paged cache tensor ``[num_blocks, block_size, Hkv, D]`` whose blocks are dense."""
    if not isinstance(t, torch.Tensor):
        raise KernelInputError(f"{name} must be a torch.Tensor")
    require_ndim(name, t, 4, "[num_blocks, block_size, Hkv, D]")
    require_dtype(name, t, KV_DTYPES)
    require_inner_contiguous(name, t, 3, "each block dense: [block_size, Hkv, D] row-major")
    return t


def layout(t: torch.Tensor) -> tuple[object, ...]:
    """What a check of ``t`` may depend on besides its values: identity, address, shape,
    strides, dtype, device. In-place ``resize_``/``set_``/``as_strided_`` change it."""
    return (id(t), t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)


class CheckMemo:
    """Results of checks that cannot change while the tensors keep their layout, so a call
    repeated on the same caches skips them (pinnedness, for one, is a driver call).

    Keys hold :func:`layout` of the tensors plus any hashable extras; an entry is used only
    while every tensor it was made from is still alive (held by weak reference, so an
    ``id`` cannot be reused by a new tensor meanwhile) and the memo keeps at most
    ``capacity`` entries (one per layer's caches, typically), dropping the oldest.

    >>> memo = CheckMemo()
    >>> t = torch.zeros(2)
    >>> memo.get((t,), "x") is None
    True
    >>> memo.put((t,), "x", 42)
    >>> memo.get((t,), "x"), memo.get((t.view(1, 2),), "x")
    (42, None)
    """

    def __init__(self, capacity: int = 64) -> None:
        self._capacity = capacity
        self._entries: dict[
            tuple[object, ...], tuple[tuple[weakref.ref[torch.Tensor], ...], object]
        ] = {}

    @staticmethod
    def _key(tensors: Sequence[torch.Tensor], extra: Hashable) -> tuple[object, ...]:
        return (extra, *(layout(t) for t in tensors))

    def get(self, tensors: Sequence[torch.Tensor], extra: Hashable) -> object | None:
        """The value stored for these tensors in this layout, or None."""
        key = self._key(tensors, extra)
        entry = self._entries.get(key)
        if entry is None:
            return None
        refs, value = entry
        if any(r() is not t for r, t in zip(refs, tensors, strict=True)):
            del self._entries[key]
            return None
        return value

    def put(self, tensors: Sequence[torch.Tensor], extra: Hashable, value: object) -> None:
        if len(self._entries) >= self._capacity:
            del self._entries[next(iter(self._entries))]
        refs = tuple(weakref.ref(t) for t in tensors)
        self._entries[self._key(tensors, extra)] = (refs, value)

    def clear(self) -> None:
        self._entries.clear()
