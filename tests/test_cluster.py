"""Tests for fxshard.cluster: the `devices` argument forms, cluster queries and the JSON round-trip.

Specs, presets, links and byte sizes are tested in test_devices.py.
"""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxshard.cluster as cluster_module
import fxshard.devices as devices_module
from fxshard.cluster import (
    DTYPE_KEYS,
    LINK_PRESETS,
    PRESETS,
    SELF_LINK,
    Cluster,
    Device,
    DeviceSpec,
    Link,
)
from fxshard.devices import format_budget, local_cpu_spec
from fxshard.errors import ClusterError, DeviceSpecError, FxshardError

EXPORTS = ["DTYPE_KEYS", "LINK_PRESETS", "PRESETS", "SELF_LINK", "Cluster", "Device", "DeviceKind", "DeviceSpec",
           "Link", "default_link", "format_bytes", "get_preset", "host_memory_bytes", "parse_bytes"]


def fake_cuda(monkeypatch: pytest.MonkeyPatch, gpus: list[tuple[str, int]], major: int = 9) -> None:
    """Pretend this machine has the given (name, total_memory) GPUs."""
    props = [SimpleNamespace(name=name, total_memory=memory, multi_processor_count=80, major=major)
             for name, memory in gpus]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(gpus))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props[index])


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, [])


def test_reexports_device_names() -> None:
    # Other modules import these from fxshard.cluster; they must stay the very objects of fxshard.devices.
    assert sorted(cluster_module.__all__) == sorted(EXPORTS)
    for name in EXPORTS:
        if hasattr(devices_module, name):
            assert getattr(cluster_module, name) is getattr(devices_module, name), name


# ---------------------------------------------------------------- parse: cluster strings


@pytest.mark.parametrize(("text", "devices", "machines", "preset", "describe"), [
    ("A100-80GB", 1, 1, "A100-80GB", "A100-80GB"),
    ("8xA100-80GB", 8, 1, "A100-80GB", "8xA100-80GB"),
    ("2x8xH100-80GB", 16, 2, "H100-80GB", "2x8xH100-80GB"),
    ("2X8Xh100", 16, 2, "H100-80GB", "2x8xH100-80GB"),
    (" 2 x 4 x T4 ", 8, 2, "T4", "2x4xT4"),
    ("3x1xL4", 3, 3, "L4", "3x1xL4"),
    ("4xMI300X", 4, 1, "MI300X", "4xMI300X"),
    ("4xcpu", 4, 1, "cpu", "4xcpu"),
])
def test_parse_preset_strings(text: str, devices: int, machines: int, preset: str, describe: str) -> None:
    cluster = Cluster.parse(text)
    assert cluster.num_devices == devices and cluster.num_machines == machines
    assert all(device.spec == PRESETS[preset] for device in cluster.devices)
    assert cluster.is_homogeneous
    assert cluster.describe() == describe
    assert Cluster.parse(cluster.describe()) == cluster


def test_parse_machines_and_local_indices() -> None:
    cluster = Cluster.parse("2x4xH100-80GB")
    assert [d.index for d in cluster.devices] == list(range(8))
    assert [d.machine for d in cluster.devices] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [d.local_index for d in cluster.devices] == [0, 1, 2, 3] * 2
    assert [d.torch_device for d in cluster.devices] == [f"cuda:{i}" for i in range(4)] * 2
    assert [d.torch_device for d in Cluster.parse("2xcpu").devices] == ["cpu", "cpu"]
    assert [d.index for d in cluster.devices_on(1)] == [4, 5, 6, 7]


@pytest.mark.parametrize(("text", "memory"), [
    ("4xcpu:2GB", 2_000_000_000), ("4xcpu:2gb", 2_000_000_000), ("2xcpu:512MiB", 512 << 20),
    ("cpu:1.5GiB", 3 << 29), ("2x2xH100-80GB:40GB", 40_000_000_000), ("2xcpu:4096", 4096),
])
def test_parse_memory_budget(text: str, memory: int) -> None:
    cluster = Cluster.parse(text)
    assert {device.spec.memory_bytes for device in cluster.devices} == {memory}
    assert Cluster.parse(cluster.describe()) == cluster


def test_parse_heterogeneous() -> None:
    cluster = Cluster.parse("4xA100-80GB+4xV100-32GB")
    assert cluster.num_devices == 8 and cluster.num_machines == 2 and not cluster.is_homogeneous
    assert [d.spec.name for d in cluster.devices] == ["A100-80GB"] * 4 + ["V100-32GB"] * 4
    assert [d.machine for d in cluster.devices] == [0] * 4 + [1] * 4
    assert [d.local_index for d in cluster.devices] == [0, 1, 2, 3] * 2
    assert cluster.intra_link.name == "nvlink2" and cluster.inter_link.name == "ib-edr"  # the slower kind's
    assert cluster.describe() == "4xA100-80GB+4xV100-32GB"
    three = Cluster.parse("2x8xH100-80GB + 4xcpu:1GB + T4")
    assert three.num_machines == 4 and three.num_devices == 21
    assert three.intra_link.name == "loopback"
    assert three.describe() == "2x8xH100-80GB+4xcpu:1GB+T4"
    assert Cluster.parse(three.describe()) == three


def test_parse_overrides_and_existing_cluster() -> None:
    base = Cluster.parse("2x2xA100-80GB")
    assert Cluster.parse(base) is base
    fast = Link(bandwidth=1e12, latency_s=0.0, name="fast")
    slow = Link(bandwidth=1e6, latency_s=1e-3, name="slow")
    custom = Cluster.parse("2x2xA100-80GB", intra_link=fast, inter_link=slow)
    assert custom.link(0, 1) == fast and custom.link(0, 2) == slow
    assert Cluster.parse(base, inter_link=slow).inter_link == slow
    assert Cluster.parse(base, inter_link=slow).intra_link == base.intra_link


# ---------------------------------------------------------------- parse: ints and device lists


def test_parse_int_without_cuda(no_cuda: None) -> None:
    cluster = Cluster.parse(4)
    assert cluster.num_devices == 4 and cluster.num_machines == 1
    assert [d.torch_device for d in cluster.devices] == ["cpu"] * 4
    host = cluster_module.host_memory_bytes()
    assert all(d.spec.memory_bytes == host // 4 for d in cluster.devices)
    assert Cluster.parse("4") == cluster == Cluster.parse(np.int64(4))
    # A lone "cpu:N" is torch's spelling of the CPU device, not a memory budget of N bytes.
    assert Cluster.parse("cpu:0") == Cluster.parse(["cpu"]) == Cluster.local()
    assert Cluster.parse(["cpu", torch.device("cpu")]).devices[1].spec.memory_bytes == host // 2


def test_local_without_cuda(no_cuda: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    cluster = Cluster.local()
    assert cluster.num_devices == 1 and cluster.devices[0].torch_device == "cpu"
    spec = cluster.devices[0].spec
    assert spec == local_cpu_spec() and spec.name == "cpu" and spec.kind == "cpu"
    assert spec.memory_bytes == cluster_module.host_memory_bytes() > 0
    assert spec.peak_flops_for(torch.float32) == 12 * 32 * 2.5e9 and spec.memory_bandwidth == 100e9
    assert cluster.intra_link.name == "loopback"
    assert all(d.spec == local_cpu_spec(devices=3) for d in Cluster.parse(3).devices)
    # describe() gives the memory; the text parses back to the generic preset's figures and describes the same.
    text = cluster.describe()
    assert text == f"cpu:{format_budget(spec.memory_bytes)}"
    parsed = Cluster.parse(text).devices[0].spec
    assert parsed == PRESETS["cpu"].with_memory(parsed.memory_bytes)
    assert Cluster.parse(text).describe() == text


def test_local_cpu_describe(no_cuda: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices_module, "host_memory_bytes", lambda: 24_731_708 << 10)
    assert Cluster.local().describe() == "cpu:23.6GiB"
    assert Cluster.parse(4).describe() == "4xcpu:5.9GiB"
    assert Cluster.parse("cpu:23.6GiB").describe() == "cpu:23.6GiB"
    assert Cluster.parse("cpu").describe() == "cpu"  # a cluster string names the generic preset


@settings(max_examples=200, deadline=None)
@given(memory=st.integers(min_value=1, max_value=1 << 42) | st.sampled_from([16 << 30, 85_899_000_000, 80 << 30]),
       preset=st.sampled_from(["cpu", "H100-80GB", "T4"]), local_cpu=st.booleans())
def test_describe_is_a_fixed_point(memory: int, preset: str, local_cpu: bool) -> None:
    # The memory a device reports never quite matches a preset's; near misses must not flip the text.
    spec = PRESETS[preset].with_memory(memory)
    if local_cpu and preset == "cpu":
        spec = DeviceSpec(**{**spec.to_dict(), "peak_flops": {"float32": 1e11}})
    devices = tuple(Device(index=i, machine=0, local_index=i, spec=spec, torch_device="cpu") for i in range(2))
    text = Cluster(devices=devices, intra_link=SELF_LINK, inter_link=SELF_LINK).describe()
    assert Cluster.parse(text).describe() == text
    assert text.startswith(f"2x{preset}")


def test_local_with_fake_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    real_memory = 85_031_714_816  # what an H100 80GB reports: a little under 80 GiB
    fake_cuda(monkeypatch, [("NVIDIA H100 80GB HBM3", real_memory)] * 2)
    cluster = Cluster.local()
    assert [d.torch_device for d in cluster.devices] == ["cuda:0", "cuda:1"]
    assert cluster.devices[0].spec == PRESETS["H100-80GB"].with_memory(real_memory)
    assert cluster.intra_link.name == "nvlink4"
    assert cluster.describe() == "2xH100-80GB:79.2GiB"
    assert Cluster.parse(2) == cluster
    assert Cluster.parse(["cuda:0", "cuda:1"]) == cluster
    assert Cluster.parse("cuda:1").devices[0].torch_device == "cuda:1"
    with pytest.raises(DeviceSpecError, match="devices=3, but this machine has 2 CUDA devices"):
        Cluster.parse(3)
    with pytest.raises(DeviceSpecError, match="cuda:5"):
        Cluster.parse(["cuda:5"])
    with pytest.raises(DeviceSpecError, match="'cuda:0' twice"):
        Cluster.parse(["cuda:0", "cuda:0"])


def test_unknown_gpu_gets_conservative_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, [("NVIDIA GeForce RTX 4090", 25_000_000_000), ("NVIDIA H100 PCIe", 85_000_000_000)])
    first, second = (d.spec for d in Cluster.local().devices)
    assert first.name == "NVIDIA GeForce RTX 4090" and first.memory_bytes == 25_000_000_000
    assert 0 < first.peak_flops_for(torch.bfloat16) < PRESETS["L4"].peak_flops_for(torch.bfloat16)
    assert second.name == "NVIDIA H100 PCIe"  # slower than the SXM preset: not matched to it
    assert Cluster.local().intra_link.name == "pcie4"


def test_cuda_without_cuda_suggests_cpu(no_cuda: None) -> None:
    with pytest.raises(DeviceSpecError) as info:
        Cluster.parse(["cuda:0", "cuda:1"])
    message = str(info.value)
    assert "cuda:0" in message and "no CUDA" in message and "'cpu'" in message and "xA100-80GB" in message


# ---------------------------------------------------------------- bad input


BAD_DEVICES = [
    ("", DeviceSpecError, ['devices=""', "8xA100-80GB"]),
    ("   ", DeviceSpecError, ["empty"]),
    ([], DeviceSpecError, ["devices=[]"]),
    ((), DeviceSpecError, ["devices=[]"]),
    (0, DeviceSpecError, ["devices=0", "positive"]),
    (-2, DeviceSpecError, ["devices=-2", "positive"]),
    ("0", DeviceSpecError, ["devices=0"]),
    (True, DeviceSpecError, ["devices=True", "bool"]),
    (False, DeviceSpecError, ["devices=False", "bool"]),
    (2.0, DeviceSpecError, ["devices=2.0", "float"]),
    (None, DeviceSpecError, ["devices=None"]),
    ({"cuda:0": 1}, DeviceSpecError, ["dict"]),
    ("0xH100-80GB", DeviceSpecError, ['"0xH100-80GB"', 'count "0"']),
    ("2x0xH100-80GB", DeviceSpecError, ['count "0"']),
    ("-1xH100-80GB", DeviceSpecError, ['count "-1"']),
    ("1.5xH100-80GB", DeviceSpecError, ['count "1.5"']),
    ("2x2x2xH100-80GB", DeviceSpecError, ["3 counts"]),
    ("4xcpu:0GB", DeviceSpecError, ['"4xcpu:0GB"', '"0GB"', "positive"]),
    ("4xcpu:0", DeviceSpecError, ['"4xcpu:0"', "positive"]),
    ("4xcpu:-1GB", DeviceSpecError, ['"4xcpu:-1GB"', '"-1GB"']),
    ("4xcpu:2XB", DeviceSpecError, ['"2XB"', 'unknown unit "XB"']),
    ("4xcpu:2 G B", DeviceSpecError, ['"2 G B"']),
    ("4xcpu:", DeviceSpecError, ['"4xcpu:"', "bad byte size"]),
    ("4xcpu:2GB:1GB", DeviceSpecError, ['"2GB:1GB"']),
    ("8xA100-80G", DeviceSpecError, ['"8xA100-80G"', 'unknown device preset "A100-80G"',
                                     'did you mean "A100-80GB"?', "Known presets: "]),
    ("8xA100", DeviceSpecError, ['"8xA100"', "ambiguous"]),
    ("8xTPUv5", DeviceSpecError, ['"TPUv5"', "Known presets"]),
    ("8x", DeviceSpecError, ['"8x"', "no device preset"]),
    ("8xH100-80GB+", DeviceSpecError, ['"8xH100-80GB+"', "empty term"]),
    ("+8xH100-80GB", DeviceSpecError, ["empty term"]),
    ("8xH100-80GB++T4", DeviceSpecError, ["empty term"]),
    ("8xH100-80GB, 2xT4", DeviceSpecError, ['"8xH100-80GB, 2xT4"']),
    ("!!@#", DeviceSpecError, ['"!!@#"']),
    ("\u00b2", DeviceSpecError, ['"\u00b2"']),  # str.isdigit() is true for a superscript two
    ("9999x9999xcpu", DeviceSpecError, ["99,980,001 devices", "65,536"]),
    ([3], DeviceSpecError, ["devices[0] = 3", "int"]),
    (["cpu", None], DeviceSpecError, ["devices[1] = None"]),
    (["cpu", 1.5], DeviceSpecError, ["devices[1] = 1.5"]),
    (["cpu", "gpu:0"], DeviceSpecError, ["devices[1] = 'gpu:0'"]),
    (["4xcpu"], DeviceSpecError, ["devices[0] = '4xcpu'", "goes alone"]),
    (["meta"], DeviceSpecError, ["'meta'", "not supported"]),
    ([""], DeviceSpecError, ["devices[0] = ''"]),
]


@pytest.mark.parametrize(("devices", "error", "fragments"), BAD_DEVICES, ids=[repr(case[0]) for case in BAD_DEVICES])
def test_bad_devices(no_cuda: None, devices: object, error: type[Exception], fragments: list[str]) -> None:
    with pytest.raises(error) as info:
        Cluster.parse(devices)
    assert isinstance(info.value, FxshardError)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


# ---------------------------------------------------------------- cluster queries


def test_link_selection() -> None:
    cluster = Cluster.parse("2x4xA100-80GB")
    assert cluster.link(0, 3) is cluster.intra_link and cluster.intra_link.name == "nvlink3"
    assert cluster.link(3, 4) is cluster.inter_link and cluster.inter_link.name == "ib-hdr"
    assert cluster.link(7, 0) is cluster.inter_link
    same = cluster.link(5, 5)
    assert same.bandwidth == math.inf and same.latency_s == 0.0 and same.transfer_time(1 << 40) == 0.0
    assert cluster.link(0, 1).transfer_time(300e9) == pytest.approx(1.0 + 3e-6)


def test_link_accepts_numpy_indices() -> None:
    cluster = Cluster.parse("2x4xA100-80GB")
    assert cluster.link(np.int64(0), np.int32(4)) is cluster.inter_link


def test_largest_cluster_is_quick() -> None:
    cluster = Cluster.parse("8192x8xH100-80GB")
    assert cluster.num_devices == 65_536 and cluster.describe() == "8192x8xH100-80GB"
    assert cluster.link(0, 65_535) is cluster.inter_link


@pytest.mark.parametrize(("a", "b", "bad"), [(0, 8, "8"), (-1, 0, "-1"), (0, 100, "100"), (True, 0, "True"),
                                             ("0", 1, "'0'"), (1.0, 1, "1.0")])
def test_link_index_out_of_range(a: object, b: object, bad: str) -> None:
    cluster = Cluster.parse("2x4xA100-80GB")
    with pytest.raises(ClusterError) as info:
        cluster.link(a, b)  # type: ignore[arg-type]
    assert f"device index {bad}" in str(info.value) and "0..7" in str(info.value)


def test_subset() -> None:
    cluster = Cluster.parse("2x4xH100-80GB")
    sub = cluster.subset([6, 1, 7])
    assert [d.index for d in sub.devices] == [0, 1, 2]
    assert [d.machine for d in sub.devices] == [0, 1, 1]
    assert [d.local_index for d in sub.devices] == [0, 0, 1]
    assert [d.torch_device for d in sub.devices] == ["cuda:1", "cuda:2", "cuda:3"]  # physical devices kept
    assert sub.link(1, 2) is sub.intra_link and sub.link(0, 1) is sub.inter_link
    assert sub.describe() == "H100-80GB+2xH100-80GB"
    assert cluster.subset(range(4)) == Cluster.parse("4xH100-80GB")
    for bad, fragment in (([], "subset([])"), ([1, 1], "repeats"), ([8], "device index 8")):
        with pytest.raises(ClusterError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                           .replace("]", r"\]")):
            cluster.subset(bad)


def test_describe_mixed_machine_and_repr() -> None:
    a100, v100 = PRESETS["A100-80GB"], PRESETS["V100-32GB"]
    devices = tuple(Device(index=i, machine=0, local_index=i, spec=spec, torch_device=f"cuda:{i}")
                    for i, spec in enumerate([a100, a100, v100]))
    cluster = Cluster(devices=devices, intra_link=LINK_PRESETS["pcie4"], inter_link=LINK_PRESETS["ib-hdr"])
    assert cluster.describe() == "machine 0: 2xA100-80GB, 1xV100-32GB"
    assert "2x8xH100-80GB" in repr(Cluster.parse("2x8xH100-80GB"))


def test_cluster_validation() -> None:
    spec = PRESETS["T4"]
    link = LINK_PRESETS["pcie3"]
    with pytest.raises(ClusterError, match="non-empty"):
        Cluster(devices=(), intra_link=link, inter_link=link)
    with pytest.raises(ClusterError, match=r"\(1, 0, 0\)"):
        Cluster(devices=(Device(index=1, machine=0, local_index=0, spec=spec, torch_device="cuda:0"),),
                intra_link=link, inter_link=link)
    with pytest.raises(ClusterError, match="machine = -1"):
        Device(index=0, machine=-1, local_index=0, spec=spec, torch_device="cuda:0")
    with pytest.raises(ClusterError, match="expected a Link"):
        Cluster(devices=Cluster.parse("T4").devices, intra_link=link, inter_link="ib")  # type: ignore[arg-type]


# ---------------------------------------------------------------- JSON


@pytest.mark.parametrize("text", ["cpu", "8xA100-80GB", "2x8xH100-80GB", "4xcpu:2GB", "4xA100-80GB+4xV100-32GB",
                                  "2x2xMI300X:100GiB+3xL4+T4"])
def test_json_round_trip(text: str) -> None:
    cluster = Cluster.parse(text)
    restored = Cluster.from_json(cluster.to_json())
    assert restored == cluster and restored.describe() == cluster.describe()
    assert Cluster.from_dict(json.loads(json.dumps(cluster.to_dict()))) == cluster
    assert len(cluster.to_dict()["specs"]) == len({d.spec for d in cluster.devices})


def test_json_round_trip_custom(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, [("Mystery GPU", 12_345_678_901)])
    for cluster in (Cluster.local(), Cluster.parse("2x2xcpu").subset([0, 3]),
                    Cluster.parse("T4", intra_link=SELF_LINK, inter_link=Link(bandwidth=0.1, latency_s=1.0))):
        assert Cluster.from_json(cluster.to_json()) == cluster


specs = st.builds(
    DeviceSpec,
    name=st.text(min_size=1, max_size=12).filter(str.strip),
    memory_bytes=st.integers(min_value=1, max_value=1 << 50),
    peak_flops=st.dictionaries(st.sampled_from(DTYPE_KEYS), st.floats(min_value=1e-3, max_value=1e18),
                               min_size=0).map(lambda table: {**table, "float32": table.get("float32", 1.0)}),
    memory_bandwidth=st.floats(min_value=1e-3, max_value=1e15),
    kind=st.sampled_from(["cuda", "rocm", "cpu"]),
    source=st.text(max_size=20),
)
links = st.builds(Link, bandwidth=st.floats(min_value=1e-3, max_value=1e15) | st.just(math.inf),
                  latency_s=st.floats(min_value=0.0, max_value=1.0), name=st.text(max_size=8))


@st.composite
def clusters(draw: st.DrawFn) -> Cluster:
    machines = draw(st.lists(st.lists(specs, min_size=1, max_size=3), min_size=1, max_size=3))
    devices = []
    for machine, machine_specs in enumerate(machines):
        for local, spec in enumerate(machine_specs):
            devices.append(Device(index=len(devices), machine=machine, local_index=local, spec=spec,
                                  torch_device="cpu" if spec.kind == "cpu" else f"cuda:{local}"))
    return Cluster(devices=tuple(devices), intra_link=draw(links), inter_link=draw(links))


@settings(max_examples=60, deadline=None)
@given(clusters())
def test_json_round_trip_property(cluster: Cluster) -> None:
    assert Cluster.from_json(cluster.to_json()) == cluster
    assert cluster.num_devices == sum(len(cluster.devices_on(m)) for m in range(cluster.num_machines))


def _valid() -> dict:
    return Cluster.parse("2xT4").to_dict()


def _without(path: tuple) -> dict:
    data = _valid()
    target = data
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return data


def _with(path: tuple, value: object) -> dict:
    data = _valid()
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return data


BAD_JSON = [
    ("{not json", ["malformed"]),
    ("", ["malformed"]),
    ("[]", ["expected a JSON object", "list"]),
    ("null", ["expected a JSON object"]),
    (json.dumps(_without(("devices",))), ["missing fields ['devices']"]),
    (json.dumps(_without(("intra_link",))), ["missing fields ['intra_link']"]),
    (json.dumps(_without(("specs", 0, "memory_bytes"))), ["cluster specs", "missing fields ['memory_bytes']"]),
    (json.dumps(_without(("devices", 1, "machine"))), ["devices[1]", "missing fields ['machine']"]),
    (json.dumps(_without(("inter_link", "bandwidth"))), ["Link", "['bandwidth']"]),
    (json.dumps(_with(("extra",), 1)), ["unknown fields ['extra']"]),
    (json.dumps(_with(("fxshard_cluster",), 7)), ["version 7"]),
    (json.dumps(_with(("devices",), {})), ["cluster devices", "JSON list"]),
    (json.dumps(_with(("devices",), [])), ["non-empty"]),
    (json.dumps(_with(("devices", 1, "spec"), 3)), ["devices[1] spec = 3"]),
    (json.dumps(_with(("devices", 1, "index"), 5)), ["(5, 0, 1)"]),
    (json.dumps(_with(("devices", 0, "machine"), "zero")), ["machine = 'zero'"]),
    (json.dumps(_with(("specs", 0, "memory_bytes"), -1)), ["memory_bytes = -1"]),
    (json.dumps(_with(("specs", 0, "peak_flops"), {"bf16": 1.0})), ["'bf16'"]),
    (json.dumps(_with(("intra_link", "latency_s"), -1)), ["latency_s = -1"]),
]


@pytest.mark.parametrize(("text", "fragments"), BAD_JSON, ids=range(len(BAD_JSON)))
def test_bad_json(text: str, fragments: list[str]) -> None:
    with pytest.raises(ClusterError) as info:
        Cluster.from_json(text)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_from_json_rejects_non_text() -> None:
    with pytest.raises(ClusterError, match="malformed"):
        Cluster.from_json(None)  # type: ignore[arg-type]

