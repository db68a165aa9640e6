"""Host identity parsers on captured tool outputs (fixtures/hardware), and the host key."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from servelab import hardware as hw

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "hardware"


def sample(name: str) -> str:
    return (FIX / name).read_text()


def fake_runner(outputs: dict[str, str]) -> hw.Runner:
    """Answers a command with the sample registered for its joined argv, else None."""

    def run(argv: Sequence[str]) -> str | None:
        return outputs.get(" ".join(argv))

    return run


B70_TOOLS = {
    "xpu-smi discovery -j": sample("xpu-smi-discovery.json"),
    "xpu-smi discovery -d 0 -j": sample("xpu-smi-device-0.json"),
    "xpu-smi discovery -d 1 -j": sample("xpu-smi-device-1.json"),
    "lscpu": sample("lscpu-threadripper.txt"),
}
NVIDIA_QUERY = f"nvidia-smi {hw.NVIDIA_QUERY} --format=csv,noheader,nounits"


def test_xpu_smi_json_and_table_agree() -> None:
    j = hw.parse_xpu_smi_discovery(sample("xpu-smi-discovery.json"))
    t = hw.parse_xpu_smi_discovery(sample("xpu-smi-discovery.txt"))
    assert [(a.index, a.name) for a in j] == [(a.index, a.name) for a in t]
    assert [a.index for a in j] == [0, 1]
    assert j[0].name == "Intel(R) Arc(TM) Pro B70 Graphics"


def test_xpu_smi_device_memory_and_driver() -> None:
    mem, drv = hw.parse_xpu_smi_device(sample("xpu-smi-device-0.json"))
    assert mem == 32 * 2**30
    assert drv == "I915_25.18.33578_PSB_250602.10"


def test_sycl_ls_keeps_level_zero_gpus_only() -> None:
    devs = hw.parse_sycl_ls(sample("sycl-ls.txt"))
    assert [(d.index, d.name, d.driver) for d in devs] == [
        (0, "Intel(R) Arc(TM) Pro B70 Graphics", "1.6.33578+15"),
        (1, "Intel(R) Arc(TM) Pro B70 Graphics", "1.6.33578+15"),
    ]


def test_nvidia_smi_csv() -> None:
    devs = hw.parse_nvidia_smi_csv(sample("nvidia-smi-query.csv"))
    assert len(devs) == 2
    assert devs[1].name == "NVIDIA H100 80GB HBM3"
    assert devs[1].memory_bytes == 81559 * 2**20
    assert devs[1].driver == "550.54.15"
    assert devs[0].kind == "cuda"


@pytest.mark.parametrize(
    ("name", "model", "cores", "threads"),
    [
        ("lscpu-threadripper.txt", "AMD Ryzen Threadripper PRO 7965WX 24-Cores", 24, 48),
        ("lscpu-2core-vm.txt", "Intel(R) Xeon(R) CPU @ 2.20GHz", 1, 2),
    ],
)
def test_lscpu(name: str, model: str, cores: int, threads: int) -> None:
    fields = hw.parse_lscpu(sample(name))
    assert fields["Model name"] == model
    assert hw.cpu_counts_from_lscpu(fields) == (cores, threads)


def test_meminfo_and_os_release() -> None:
    assert hw.parse_meminfo(sample("meminfo.txt")) == 263739516 * 1024
    assert hw.parse_meminfo("garbage") is None
    assert hw.parse_os_release(sample("os-release.txt")) == "Ubuntu 24.04.2 LTS"


def test_collect_host_with_b70_samples() -> None:
    host = hw.collect_host(fake_runner(B70_TOOLS))
    assert host.accelerator_kind == "xpu"
    assert len(host.accelerators) == 2
    assert host.accelerators[0].memory_bytes == 32 * 2**30
    assert host.cpu_cores == 24 and host.cpu_threads == 48
    assert host.key.startswith("xpu-2x-intel-arc-pro-b70-graphics-")
    assert "2x Intel(R) Arc(TM) Pro B70 Graphics (32.0 GiB)" in host.describe_hardware()
    assert host.drivers() == "I915_25.18.33578_PSB_250602.10"


def test_sycl_ls_is_the_fallback_when_xpu_smi_is_missing() -> None:
    host = hw.collect_host(fake_runner({"sycl-ls": sample("sycl-ls.txt")}))
    assert [a.source for a in host.accelerators] == ["sycl-ls", "sycl-ls"]


def test_collect_host_with_nvidia_samples() -> None:
    host = hw.collect_host(fake_runner({NVIDIA_QUERY: sample("nvidia-smi-query.csv")}))
    assert host.accelerator_kind == "cuda"
    assert host.key.startswith("cuda-2x-nvidia-h100-80gb-hbm3-")


def test_host_key_cpu_only_is_stable_and_differs_from_gpu_host() -> None:
    none = fake_runner({})
    k1, k2 = hw.host_key(none), hw.host_key(none)
    assert k1 == k2 and k1.startswith("cpu-")
    gpu = hw.host_key(fake_runner(B70_TOOLS))
    assert gpu != k1


def test_host_key_ignores_driver_but_not_card_count() -> None:
    a = hw.parse_nvidia_smi_csv(sample("nvidia-smi-query.csv"))
    upgraded = [
        hw.Accelerator(x.kind, x.index, x.name, x.memory_bytes, "560.1", x.source) for x in a
    ]
    assert hw.make_host_key("cpu", 8, "x86_64", a) == hw.make_host_key("cpu", 8, "x86_64", upgraded)
    assert hw.make_host_key("cpu", 8, "x86_64", a) != hw.make_host_key("cpu", 8, "x86_64", a[:1])


def test_accelerator_available_counts_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("servelab.hardware.shutil.which", lambda name: f"/usr/bin/{name}")
    runner = fake_runner({NVIDIA_QUERY: sample("nvidia-smi-query.csv")})
    assert hw.accelerator_available("cuda", 2, runner) == (True, "")
    ok, why = hw.accelerator_available("cuda", 4, runner)
    assert not ok and "found 2 cuda device(s), the profile needs 4" in why
    assert hw.accelerator_available("cpu", 0) == (True, "")
    assert not hw.accelerator_available("tpu", 1)[0]


def test_accelerator_available_without_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("servelab.hardware.shutil.which", lambda name: None)
    ok, why = hw.accelerator_available("xpu", 1)
    assert not ok and "xpu-smi" in why


def test_patch_hashes(tmp_path: Path) -> None:
    (tmp_path / "a.patch").write_text("diff")
    got = dict(hw.patch_hashes(["a.patch", "gone.patch"], tmp_path))
    assert got["a.patch"] == hashlib.sha256(b"diff").hexdigest()
    assert got["gone.patch"] == "(missing)"


def test_engine_identity_of_installed_packages() -> None:
    assert hw.distribution_version("pytest") is not None
    assert hw.distribution_version("no-such-distribution-xyz") is None
    assert hw.engine_commit("no_such_module_xyz") is None


def test_torch_fallback_reads_device_properties(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.xpu / torch.cuda fill in when the vendor tools are missing (a typed fake torch:
    the real one here is the CPU build)."""
    import importlib.machinery
    import types

    class Props:
        name = "Intel(R) Arc(TM) Pro B70 Graphics"
        total_memory = 32 * 2**30

    xpu = types.SimpleNamespace(
        is_available=lambda: True, device_count=lambda: 2, get_device_properties=lambda i: Props
    )
    cuda = types.SimpleNamespace(is_available=lambda: False)
    fake = types.ModuleType("torch")
    fake.__spec__ = importlib.machinery.ModuleSpec("torch", None)
    fake.xpu = xpu  # type: ignore[attr-defined]
    fake.cuda = cuda  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch", fake)
    devs = hw.accelerators(fake_runner({}), use_torch=True)
    assert [(d.kind, d.index, d.memory_bytes, d.source) for d in devs] == [
        ("xpu", 0, 32 * 2**30, "torch.xpu"),
        ("xpu", 1, 32 * 2**30, "torch.xpu"),
    ]
    assert hw.accelerators(fake_runner({})) == []  # torch only when asked


# --------------------------------------------------------------------------- PCIe links


def test_xpu_smi_device_pcie_link() -> None:
    assert hw.parse_xpu_smi_pcie(sample("xpu-smi-device-0.json")) == (5, 16)
    assert hw.parse_xpu_smi_pcie('{"pcie_generation": ""}') == (None, None)


def test_b70_host_identity_keeps_the_pcie_link() -> None:
    host = hw.collect_host(fake_runner(B70_TOOLS))
    assert [(a.pcie_gen, a.pcie_width) for a in host.accelerators] == [(5, 16), (5, 16)]
    assert "2x Intel(R) Arc(TM) Pro B70 Graphics (32.0 GiB) on PCIe Gen5 x16" in (
        host.describe_hardware()
    )
    assert host.to_dict()["accelerators"][0]["pcie_gen"] == 5


def test_nvidia_smi_pcie_columns_from_a_real_capture() -> None:
    (dev,) = hw.parse_nvidia_smi_csv(sample("nvidia-smi-query-pcie.csv"))
    assert (dev.name, dev.memory_bytes, dev.driver) == (
        "NVIDIA H100 80GB HBM3",
        81559 * 2**20,
        "580.159.04",
    )
    assert (dev.pcie_gen, dev.pcie_width) == (5, 16)
    host = hw.collect_host(fake_runner({NVIDIA_QUERY: sample("nvidia-smi-query-pcie.csv")}))
    assert "1x NVIDIA H100 80GB HBM3 (79.6 GiB) on PCIe Gen5 x16" in host.describe_hardware()
    # The older four-column capture still parses, without a link.
    old = hw.parse_nvidia_smi_csv(sample("nvidia-smi-query.csv"))
    assert [(a.pcie_gen, a.pcie_width) for a in old] == [(None, None), (None, None)]
    assert hw.parse_nvidia_smi_csv("0, GPU, 1024, 1.0, [N/A], [N/A]")[0].link() is None


def test_cards_on_different_links_are_described_apart() -> None:
    a = hw.Accelerator("xpu", 0, "B70", 2**35, None, "xpu-smi", 5, 16)
    b = hw.Accelerator("xpu", 1, "B70", 2**35, None, "xpu-smi", 5, 8)
    host = hw.HostIdentity("k", "cpu", 1, 2, 2**30, "os", "k", "x86_64", (a, b))
    assert "1x B70 (32.0 GiB) on PCIe Gen5 x16, 1x B70 (32.0 GiB) on PCIe Gen5 x8" in (
        host.describe_hardware()
    )
    # The link is identity, not the baseline key (like the driver).
    assert hw.make_host_key("c", 2, "x", [a, a]) == hw.make_host_key("c", 2, "x", [a, b])


# --------------------------------------------------------------------------- stack


PROFILES = FIX.parent / "profiles"


@pytest.mark.parametrize("name", sorted(p.stem for p in PROFILES.glob("*.toml")))
def test_stack_command_is_rendered_with_the_profiles_values(name: str) -> None:
    from servelab.profiles import load_profile

    profile = load_profile(PROFILES / f"{name}.toml")
    stack = hw.collect_stack(profile, "vllm", weights=False)
    line = " ".join(stack.command)
    for placeholder in ("{model}", "{served_name}", "{host}", "{port}", "{context_len}", "{py"):
        assert placeholder not in line, line
    if profile.engine.kind == "vllm":
        assert f"--max-model-len {profile.model.context_len}" in line
    elif profile.engine.kind == "llama.cpp":
        # llama-server's --ctx-size is shared by its slots: the profile states it whole
        assert f"--alias {profile.model.served_name}" in line
    else:  # transformers serve: the served name is the model path it is pinned to
        assert "serve $MODEL_DIR" in line
    assert stack.cards == profile.hardware.count
    assert stack.accelerator == profile.hardware.accelerator
    if profile.model.path:
        assert profile.model.path in line
    # The argv a started server ran wins over the rendering.
    started = hw.collect_stack(profile, "vllm", weights=False, command=["serve", "--port", "1"])
    assert started.command == ("serve", "--port", "1")


def test_lab_profile_stack_says_four_cards_and_tp4() -> None:
    from servelab.profiles import load_profile

    stack = hw.collect_stack(load_profile(PROFILES / "gemma4-12b-c8.toml"), "vllm", weights=False)
    assert (stack.accelerator, stack.cards) == ("xpu", 4)
    assert "--tensor-parallel-size 4" in " ".join(stack.command)
    assert '{"image":4}' in stack.command  # doubled braces render to JSON
