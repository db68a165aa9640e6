"""Run vLLM's TurboQuant pieces from a bundle folder and save what they produce.

Run as a script in a clean interpreter (``python -I driver.py BUNDLE SPEC OUT``): it imports
nothing from servelab (the GPU machine runs it from a bare checkout) and refuses to load any
``vllm`` module from outside BUNDLE, so the installed engine, where there is one, cannot stand
in for the bundled files. SPEC is a ``torch.save`` dict written by
``servelab.kernels.engine.checks.write_spec``; OUT receives, per preset, the engine's
configuration numbers, its codebook, midpoints and rotation (built by the backend's own
functions), and per input case the packed cache its store wrote and its decode output.

On a machine without a GPU the caller sets ``TRITON_INTERPRET=1`` and the kernels run in
Triton's interpreter on the CPU; where Triton cannot run at all, the kernel results are left
out and ``kernel_skip`` says why.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

# The backend's set-up (TurboQuantAttentionImpl._ensure_on_device and _decode_attention) that
# this driver repeats; checks.py asserts these lines are still in the backend verbatim.
BACKEND_SETUP_LINES = (
    "H = _build_hadamard(D, str(device))",
    "layer._tq_PiT = H",
    "layer._tq_Pi = H",
    "layer._tq_centroids = get_centroids(D, self.tq_config.centroid_bits)",
    "layer._tq_midpoints = (c_sorted[:-1] + c_sorted[1:]) / 2",
    "mse_bits=self.tq_config.key_mse_bits,",
    "norm_correction=self.tq_config.norm_correction,",
)


class _OnlyFrom(importlib.abc.MetaPathFinder):
    """Load ``vllm`` and its submodules from one folder, or fail."""

    def __init__(self, root: Path) -> None:
        self.root = str(root.resolve())

    def find_spec(
        self, fullname: str, path: Any, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "vllm" and not fullname.startswith("vllm."):
            return None
        search = [self.root] if fullname == "vllm" else list(path or [])
        spec = importlib.machinery.PathFinder.find_spec(fullname, search)
        if spec is None or not str(spec.origin).startswith(self.root):
            raise ModuleNotFoundError(
                f"{fullname} is not in the bundle {self.root} (the conformance driver loads "
                "vLLM's files from the bundle only)"
            )
        return spec


def _engine(root: Path) -> None:
    import importlib

    sys.meta_path.insert(0, _OnlyFrom(root))
    sys.path.insert(0, str(root))
    importlib.import_module("vllm")


def _kernels() -> dict[str, Any]:
    import importlib

    return {
        "store": importlib.import_module("vllm.v1.attention.ops.triton_turboquant_store"),
        "decode": importlib.import_module("vllm.v1.attention.ops.triton_turboquant_decode"),
    }


def _backend_fn(root: Path, name: str, namespace: dict[str, Any]) -> Any:
    import ast

    text = (root / "vllm/v1/attention/backends/turboquant_attn.py").read_text()
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            exec(compile(ast.Module([node], []), f"turboquant_attn.py:{name}", "exec"), namespace)
            return namespace[name]
    raise LookupError(f"the backend has no function {name}")


def _kernel_skip(device: str) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"Triton is not importable ({exc})"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "no GPU and TRITON_INTERPRET is not 1: Triton has no device to run on"
    return None


def _load_by_path(root: Path, rel: str, name: str) -> ModuleType:
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, root / rel)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {root / rel}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


def static_records(root: Path, d: int, presets: list[str], device: str = "cpu") -> dict[str, Any]:
    """The engine's pure-torch pieces per preset, loaded by path (no ``vllm`` module made).

    Safe inside a process that also uses an installed vLLM: the two files import only the
    standard library and torch, and they load under private names.
    """
    import torch

    cfg_mod = _load_by_path(
        root, "vllm/model_executor/layers/quantization/turboquant/config.py", "_sl_engine_tq_config"
    )
    cen_mod = _load_by_path(
        root,
        "vllm/model_executor/layers/quantization/turboquant/centroids.py",
        "_sl_engine_tq_centroids",
    )
    ns: dict[str, Any] = {"torch": torch, "math": math, "functools": functools}
    _backend_fn(root, "_build_hadamard_cached", ns)
    build_hadamard = _backend_fn(root, "_build_hadamard", ns)
    out: dict[str, Any] = {"tq_presets": cfg_mod.TQ_PRESETS, "presets": {}}
    for name in presets:
        cfg = cfg_mod.TurboQuantConfig.from_cache_dtype(name, d)
        centroids = cen_mod.get_centroids(d, cfg.centroid_bits).to(device, torch.float32)
        c_sorted, _ = centroids.sort()
        out["presets"][name] = {
            "cfg": cfg,
            "key_packed_size": cfg.key_packed_size,
            "value_packed_size": cfg.value_packed_size,
            "slot_size": cfg.slot_size,
            "slot_size_aligned": cfg.slot_size_aligned,
            "key_fp8": cfg.key_fp8,
            "key_mse_bits": cfg.key_mse_bits,
            "centroid_bits": cfg.centroid_bits,
            "value_quant_bits": cfg.effective_value_quant_bits,
            "norm_correction": cfg.norm_correction,
            "centroids": centroids,
            "midpoints": (c_sorted[:-1] + c_sorted[1:]) / 2,
            "hadamard": build_hadamard(d, device).float(),
            "cases": {},
        }
    return out


def run(root: Path, spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    _engine(root)
    device = torch.device(spec["device"])
    d = int(spec["head_size"])
    static = static_records(root, d, list(spec["presets"]), str(device))
    out: dict[str, Any] = {
        "engine_version": getattr(sys.modules["vllm"], "ENGINE_VERSION", "unknown"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
        "torch": torch.__version__,
        "tq_presets": static["tq_presets"],
        "presets": static["presets"],
    }
    skip = _kernel_skip(device.type)
    kern: dict[str, Any] | None = None
    if skip is None:
        try:
            kern = _kernels()
            import triton

            out["triton"] = triton.__version__
        except Exception as exc:  # any import failure of the ops is the finding itself
            skip = f"importing the bundled Triton ops failed: {exc!r}"
            out["kernel_traceback"] = traceback.format_exc()
    out["kernel_skip"] = skip
    for rec in out["presets"].values():
        cfg = rec.pop("cfg")
        if kern is not None:
            for case_name, case in spec["cases"].items():
                rec["cases"][case_name] = _run_case(
                    kern, cfg, case, rec["hadamard"], rec["centroids"], rec["midpoints"], device
                )
        for key in ("centroids", "midpoints", "hadamard"):
            rec[key] = rec[key].cpu()
    return out


def _run_case(
    kern: dict[str, Any],
    cfg: Any,
    case: dict[str, Any],
    had: Any,
    centroids: Any,
    midpoints: Any,
    device: Any,
) -> dict[str, Any]:
    import torch

    k = case["key"].to(device)
    v = case["value"].to(device)
    _, hk, d = k.shape
    # Allocated as the backend's cache ([blocks, Hk, block_size, slot]) and viewed the way
    # do_kv_cache_update and forward view it: transpose(1, 2), a strided view.
    alloc = torch.zeros(
        case["num_blocks"],
        hk,
        case["block_size"],
        cfg.slot_size_aligned,
        dtype=torch.uint8,
        device=device,
    )
    cache = alloc.transpose(1, 2)
    t0 = time.perf_counter_ns()
    kern["store"].triton_turboquant_store(
        k,
        v,
        cache,
        case["slot_mapping"].to(device),
        had,
        midpoints,
        mse_bits=cfg.key_mse_bits,
        key_packed_size=cfg.key_packed_size,
        value_quant_bits=cfg.effective_value_quant_bits,
        key_fp8=cfg.key_fp8,
    )
    t1 = time.perf_counter_ns()
    res: dict[str, Any] = {"cache": cache.contiguous().cpu(), "store_ns": t1 - t0}
    q = case["query"].to(device)
    if q.numel():
        o = kern["decode"].triton_turboquant_decode_attention(
            query=q,
            kv_cache=cache,
            block_table=case["block_table"].to(device),
            seq_lens=case["seq_lens"].to(device),
            Pi=had,
            centroids=centroids,
            scale=1.0 / math.sqrt(d),
            mse_bits=cfg.key_mse_bits,
            key_packed_size=cfg.key_packed_size,
            value_quant_bits=cfg.effective_value_quant_bits,
            key_fp8=cfg.key_fp8,
            norm_correction=cfg.norm_correction,
            PiT=had,
            max_num_kv_splits=int(case["splits"]),
        )
        res["decode"] = o.float().cpu()
        res["decode_ns"] = time.perf_counter_ns() - t1
    return res


def _loaded() -> dict[str, str | None]:
    """Every ``vllm`` module this process holds, with the file it came from."""
    return {
        m: getattr(sys.modules[m], "__file__", None)
        for m in sorted(sys.modules)
        if m == "vllm" or m.startswith("vllm.")
    }


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[1] == "--imports-only":
        _engine(Path(argv[2]))
        _kernels()
        print(json.dumps(_loaded()))
        return 0
    if len(argv) != 4:
        print("usage: driver.py BUNDLE SPEC OUT | driver.py --imports-only BUNDLE", file=sys.stderr)
        return 2
    import torch

    root, spec_path, out_path = Path(argv[1]), Path(argv[2]), Path(argv[3])
    spec = torch.load(spec_path, weights_only=False)
    out = run(root, spec)
    loaded = _loaded()
    out["loaded_engine_modules"] = loaded
    torch.save(out, out_path)
    print(json.dumps({"kernel_skip": out["kernel_skip"], "modules": len(loaded)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
