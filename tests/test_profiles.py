"""Profile loading and validation: every bad input names the file, the field and the fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from servelab.errors import ProfileError
from servelab.profiles import (
    PLACEHOLDERS,
    available_profiles,
    default_profile_dirs,
    find_profile,
    load_profile,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "fixtures" / "profiles" / "cpu-smollm2.toml"


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / f"{name}.toml"
    p.write_text(text)
    return p


def default_text() -> str:
    return DEFAULT.read_text()


def test_every_shipped_profile_loads() -> None:
    found = available_profiles(default_profile_dirs(ROOT))
    assert "cpu-smollm2" in found
    for name, path in found.items():
        profile = load_profile(path)
        assert profile.name == name
        argv = profile.render_command(model="/m", port=8123, python="python3")
        assert "8123" in argv
        leftover = [a for a in argv for ph in PLACEHOLDERS if "{" + ph + "}" in a]
        assert not leftover, f"{name}: placeholders left unrendered: {leftover}"


def test_default_profile_renders_exact_command() -> None:
    p = load_profile(DEFAULT)
    argv = p.render_command(model="/models/x", port=8000, host="127.0.0.1", python="py")
    assert argv[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"]
    i = argv.index("--model")
    assert argv[i + 1] == "/models/x"
    assert argv[argv.index("--served-model-name") + 1] == "smollm2-135m-instruct"
    assert argv[argv.index("--max-model-len") + 1] == "2048"
    assert "--enforce-eager" in argv


def test_args_hash_changes_with_arguments(tmp_path: Path) -> None:
    a = load_profile(DEFAULT)
    text = default_text().replace('"--seed", "0"', '"--seed", "1"')
    b = load_profile(write(tmp_path, "cpu-smollm2", text))
    assert a.args_hash() != b.args_hash()
    assert a.args_hash() == load_profile(DEFAULT).args_hash()


def test_unknown_profile_lists_available() -> None:
    with pytest.raises(ProfileError) as info:
        find_profile("no-such-profile", default_profile_dirs(ROOT))
    assert "no-such-profile" in str(info.value)
    assert "cpu-smollm2" in str(info.value)


def test_invalid_toml_names_file(tmp_path: Path) -> None:
    p = write(tmp_path, "broken", "schema_version = 1\nname = [unclosed\n")
    with pytest.raises(ProfileError, match=r"broken\.toml: invalid TOML"):
        load_profile(p)


def test_unknown_field_named(tmp_path: Path) -> None:
    text = default_text().replace("[hardware]\n", '[hardware]\ncolour = "blue"\n')
    p = write(tmp_path, "cpu-smollm2", text)
    with pytest.raises(ProfileError) as info:
        load_profile(p)
    msg = str(info.value)
    assert str(p) in msg and "hardware.colour" in msg


def test_missing_field_named_with_type(tmp_path: Path) -> None:
    text = default_text().replace('served_name = "smollm2-135m-instruct"\n', "")
    p = write(tmp_path, "cpu-smollm2", text)
    with pytest.raises(ProfileError, match=r"missing field 'model\.served_name' \(expected str\)"):
        load_profile(p)


def test_wrong_type_named(tmp_path: Path) -> None:
    text = default_text().replace("context_len = 2048", 'context_len = "2048"')
    p = write(tmp_path, "cpu-smollm2", text)
    with pytest.raises(ProfileError, match=r"field 'model\.context_len' must be int"):
        load_profile(p)


def test_bool_is_not_an_int(tmp_path: Path) -> None:
    text = default_text().replace("count = 0", "count = true")
    with pytest.raises(ProfileError, match=r"hardware\.count"):
        load_profile(write(tmp_path, "cpu-smollm2", text))


def test_bad_literal_lists_choices(tmp_path: Path) -> None:
    text = default_text().replace('accelerator = "cpu"', 'accelerator = "tpu"')
    with pytest.raises(ProfileError, match=r"one of 'cpu', 'xpu', 'cuda'"):
        load_profile(write(tmp_path, "cpu-smollm2", text))


def test_unknown_placeholder(tmp_path: Path) -> None:
    text = default_text().replace('"--seed", "0"', '"--seed", "{seed}"')
    with pytest.raises(ProfileError, match=r"unknown placeholder.*seed"):
        load_profile(write(tmp_path, "cpu-smollm2", text))


def test_name_must_match_stem(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="file stem"):
        load_profile(write(tmp_path, "other-name", default_text()))


def test_schema_version_required(tmp_path: Path) -> None:
    text = default_text().replace("schema_version = 1", "schema_version = 99")
    with pytest.raises(ProfileError, match="schema_version"):
        load_profile(write(tmp_path, "cpu-smollm2", text))


def test_workload_must_fit_context(tmp_path: Path) -> None:
    text = default_text().replace("prompt_tokens = [32, 64, 128]", "prompt_tokens = [32, 4096]")
    with pytest.raises(ProfileError, match=r"workload prefill needs 4097 tokens.*2048"):
        load_profile(write(tmp_path, "cpu-smollm2", text))


def test_accelerator_profile_needs_count(tmp_path: Path) -> None:
    cpu, xpu = 'accelerator = "cpu"\ncount = 0', 'accelerator = "xpu"\ncount = 0'
    text = default_text().replace(cpu, xpu)
    with pytest.raises(ProfileError, match=r"hardware\.count"):
        load_profile(write(tmp_path, "cpu-smollm2", text))


def test_recall_must_fit_context(tmp_path: Path) -> None:
    forty, many = "[workloads.recall]\nlines = 40", "[workloads.recall]\nlines = 900"
    text = default_text().replace(forty, many)
    with pytest.raises(ProfileError, match=r"workload recall needs \d+ tokens.*2048"):
        load_profile(write(tmp_path, "cpu-smollm2", text))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("session_cv = 1.5", "limits.session_cv' must be within [0, 1)"),
        ("first_token_timeout_s = 0", "limits.first_token_timeout_s' must be a positive"),
        ("gate_timeout_s = -5.0", "limits.gate_timeout_s' must be a positive"),
        ("max_outstanding = 0", "limits.max_outstanding' must be a positive number"),
    ],
)
def test_limits_are_checked(tmp_path: Path, line: str, message: str) -> None:
    text = (ROOT / "fixtures" / "profiles" / "cpu-smollm2.toml").read_text()
    text = text.replace("[limits]\n", f"[limits]\n{line}\n").replace("\nsession_cv = 0.10", "")
    text = text.replace("\nfirst_token_timeout_s = 50", "").replace("\ngate_timeout_s = 900", "")
    p = tmp_path / "cpu-smollm2.toml"
    p.write_text(text)
    with pytest.raises(ProfileError, match=re.escape(message)):
        load_profile(p)


def test_max_outstanding_is_read(tmp_path: Path) -> None:
    """Issue 24: the overload cap of the validity verdict comes from the profile."""
    text = (ROOT / "fixtures" / "profiles" / "cpu-smollm2.toml").read_text()
    p = tmp_path / "cpu-smollm2.toml"
    p.write_text(text.replace("[limits]\n", "[limits]\nmax_outstanding = 12\n"))
    assert load_profile(p).limits.max_outstanding == 12
    default = load_profile(ROOT / "fixtures" / "profiles" / "cpu-smollm2.toml")
    assert default.limits.max_outstanding is None


def test_issue17_load_shapes_load_and_are_checked(tmp_path: Path) -> None:
    """H5: the multiturn and cancellation shapes and the trace's shared-prefix settings."""
    p = load_profile(write(tmp_path, "cpu-smollm2", default_text()))
    assert p.workloads.multiturn is not None and p.workloads.multiturn.turns >= 2
    c = p.workloads.cancellation
    assert c is not None and 0 < c.cancel_after_tokens < c.output_tokens
    assert p.workloads.trace is not None and p.workloads.trace.block_tokens == 64
    bad = default_text().replace("cancel_share = 0.5", "cancel_share = 1.0")
    with pytest.raises(ProfileError, match=r"cancel_share' must be within \(0, 1\)"):
        load_profile(write(tmp_path, "cpu-smollm2", bad))
    bad = default_text().replace("cancel_after_tokens = 4", "cancel_after_tokens = 16")
    with pytest.raises(ProfileError, match="cancelled mid-generation"):
        load_profile(write(tmp_path, "cpu-smollm2", bad))
    bad = default_text().replace("block_tokens = 64", "block_tokens = 0")
    with pytest.raises(ProfileError, match="block_tokens' must be >= 1"):
        load_profile(write(tmp_path, "cpu-smollm2", bad))
    long = default_text().replace("first_tokens = 136", "first_tokens = 2000")
    with pytest.raises(ProfileError, match="workload multiturn needs"):
        load_profile(write(tmp_path, "cpu-smollm2", long))
