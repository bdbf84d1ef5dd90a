"""Device models and links: specs, presets and what this machine's devices look like.

The preset figures, their datasheets, the link defaults, the nominal figures of the local CPU
spec and the size notation (:mod:`fxshard.units`, re-exported here) are documented in
``docs/devices.md``. Clusters of these devices are built in :mod:`fxshard.cluster`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import operator
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import torch

from fxshard.errors import ClusterError, DeviceSpecError
from fxshard.units import format_budget, format_bytes, parse_bytes

__all__ = [
    "DTYPE_KEYS",
    "LINK_PRESETS",
    "PRESETS",
    "SELF_LINK",
    "DeviceKind",
    "DeviceSpec",
    "Link",
    "default_link",
    "format_budget",
    "format_bytes",
    "get_preset",
    "host_memory_bytes",
    "local_cpu_spec",
    "local_gpu_spec",
    "parse_bytes",
]

DeviceKind = Literal["cuda", "rocm", "cpu"]
DTYPE_KEYS: tuple[str, ...] = ("float64", "float32", "tf32", "bfloat16", "float16", "float8", "int8")
_KINDS = ("cuda", "rocm", "cpu")


def _positive_int(value: Any, what: str, error: type[Exception]) -> int:
    if isinstance(value, bool):
        raise error(f"{what} = {value!r} is a bool; expected a positive integer")
    try:
        number = operator.index(value)
    except TypeError:
        raise error(f"{what} = {value!r} is not an integer; expected a positive integer") from None
    if number <= 0:
        raise error(f"{what} = {number} must be positive")
    return number



def _real(value: Any, what: str, error: type[Exception], *, allow_zero: bool = False,
          allow_inf: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise error(f"{what} = {value!r} is not a number")
    number = float(value)
    if math.isnan(number) or number < 0 or (number == 0 and not allow_zero):
        raise error(f"{what} = {value!r}; expected a number {'>=' if allow_zero else '>'} 0")
    if math.isinf(number) and not allow_inf:
        raise error(f"{what} = {value!r}; expected a finite number")
    return number


def _check_fields(data: Any, what: str, error: type[Exception], required: tuple[str, ...],
                  optional: tuple[str, ...] = ()) -> None:
    if not isinstance(data, Mapping):
        raise error(f"{what}: expected a JSON object, got {type(data).__name__} {data!r:.80}")
    missing = [key for key in required if key not in data]
    unknown = sorted(str(key) for key in data if key not in required and key not in optional)
    if missing or unknown:
        raise error(f"{what}: missing fields {missing}, unknown fields {unknown}; expected the "
                    f"fields {list(required + optional)} (as written by to_dict())")


@dataclass(frozen=True, kw_only=True)
class DeviceSpec:
    """One device model: usable memory, dense peak FLOP/s per dtype and memory bandwidth.

    ``peak_flops`` may be given as a mapping; it is stored as a tuple of ``(key, FLOP/s)`` pairs
    in :data:`DTYPE_KEYS` order, and must contain ``"float32"`` (the fallback figure).
    """

    name: str
    memory_bytes: int
    peak_flops: tuple[tuple[str, float], ...]
    memory_bandwidth: float
    kind: DeviceKind = "cuda"
    source: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise DeviceSpecError(f"DeviceSpec name = {self.name!r}; expected a non-empty name such as 'H100-80GB'")
        what = f"DeviceSpec {self.name!r}"
        memory = _positive_int(self.memory_bytes, f"{what} memory_bytes", DeviceSpecError)
        object.__setattr__(self, "memory_bytes", memory)
        items = self.peak_flops.items() if isinstance(self.peak_flops, Mapping) else self.peak_flops
        table: dict[str, float] = {}
        try:
            for key, value in items:
                if key not in DTYPE_KEYS:
                    raise DeviceSpecError(f"{what} peak_flops key {key!r} is unknown; "
                                          f"expected keys among {list(DTYPE_KEYS)}")
                if key in table:
                    raise DeviceSpecError(f"{what} peak_flops lists {key!r} twice; give each dtype once")
                table[key] = _real(value, f"{what} peak_flops[{key!r}]", DeviceSpecError)
        except (TypeError, ValueError) as error:
            if isinstance(error, DeviceSpecError):
                raise
            raise DeviceSpecError(f"{what} peak_flops = {self.peak_flops!r:.80}; expected a mapping or "
                                  "pairs such as {'float32': 67e12, 'bfloat16': 989e12}") from error
        if "float32" not in table:
            raise DeviceSpecError(f"{what} peak_flops has no 'float32' figure ({sorted(table)}); add one: "
                                  "it is the fallback for dtypes without a figure of their own")
        object.__setattr__(self, "peak_flops", tuple((key, table[key]) for key in DTYPE_KEYS if key in table))
        bandwidth = _real(self.memory_bandwidth, f"{what} memory_bandwidth", DeviceSpecError)
        object.__setattr__(self, "memory_bandwidth", bandwidth)
        if self.kind not in _KINDS:
            raise DeviceSpecError(f"{what} kind = {self.kind!r}; expected one of {list(_KINDS)}")
        if not isinstance(self.source, str):
            raise DeviceSpecError(f"{what} source = {self.source!r}; expected a string (a datasheet citation)")

    def peak_flops_for(self, dtype: torch.dtype, *, allow_tf32: bool = False) -> float:
        """Dense peak FLOP/s for arithmetic in ``dtype``, falling back to a figure the device has.

        Raises:
            DeviceSpecError: ``dtype`` is not a ``torch.dtype``.
        """
        if not isinstance(dtype, torch.dtype):
            raise DeviceSpecError(f"peak_flops_for({dtype!r}): expected a torch.dtype such as torch.float32")
        table = dict(self.peak_flops)
        fp32 = table["float32"]
        if dtype.is_complex:
            dtype = {torch.complex128: torch.float64, torch.complex32: torch.float16}.get(dtype, torch.float32)
        if dtype == torch.float64:
            # Consumer-class parts run FP64 far slower; their presets carry their own figure.
            return table.get("float64", fp32 / 2)
        if dtype == torch.float32:
            return table["tf32"] if allow_tf32 and "tf32" in table else fp32
        if dtype in (torch.bfloat16, torch.float16):
            return table.get(str(dtype).removeprefix("torch."), fp32)
        if dtype.is_floating_point:  # the float8 family
            return next(table[key] for key in ("float8", "float16", "bfloat16", "float32") if key in table)
        return table.get("int8", fp32)

    def with_memory(self, memory_bytes: int) -> DeviceSpec:
        """The same device with a different memory budget (bytes)."""
        return dataclasses.replace(self, memory_bytes=memory_bytes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form; :meth:`from_dict` inverts it exactly."""
        return {"name": self.name, "memory_bytes": self.memory_bytes, "peak_flops": dict(self.peak_flops),
                "memory_bandwidth": self.memory_bandwidth, "kind": self.kind, "source": self.source}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeviceSpec:
        """Rebuild a spec from :meth:`to_dict` output; raises DeviceSpecError on bad fields."""
        _check_fields(data, "DeviceSpec", DeviceSpecError, ("name", "memory_bytes", "peak_flops", "memory_bandwidth"),
                      ("kind", "source"))
        return cls(**data)


@dataclass(frozen=True, kw_only=True)
class Link:
    """A point-to-point link: one-direction bandwidth (bytes/s) and per-message latency (s)."""

    bandwidth: float
    latency_s: float
    name: str = ""

    def __post_init__(self) -> None:
        what = f"Link {self.name!r}"
        object.__setattr__(self, "bandwidth", _real(self.bandwidth, f"{what} bandwidth", ClusterError, allow_inf=True))
        object.__setattr__(self, "latency_s", _real(self.latency_s, f"{what} latency_s", ClusterError, allow_zero=True))
        if not isinstance(self.name, str):
            raise ClusterError(f"Link name = {self.name!r}; expected a string")

    def transfer_time(self, nbytes: float) -> float:
        """Seconds to move ``nbytes`` over this link (0.0 for nothing to move)."""
        size = _real(nbytes, "transfer_time nbytes", ClusterError, allow_zero=True)
        return 0.0 if size == 0 else self.latency_s + size / self.bandwidth

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form."""
        return {"name": self.name, "bandwidth": self.bandwidth, "latency_s": self.latency_s}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Link:
        """Rebuild a link from :meth:`to_dict` output."""
        _check_fields(data, "Link", ClusterError, ("bandwidth", "latency_s"), ("name",))
        return cls(**data)


SELF_LINK = Link(bandwidth=math.inf, latency_s=0.0, name="self")

_GB, _GiB = 10**9, 1 << 30
_SPARSE = "dense figures are half the datasheet's with-sparsity ones"
_A100_PDF = ("https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
             "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf")
# Memory is the card's physical capacity in GiB: the "80GB" of an H100 is 80 GiB of HBM.
PRESETS: Mapping[str, DeviceSpec] = MappingProxyType({spec.name: spec for spec in (
    DeviceSpec(name="V100-32GB", memory_bytes=32 * _GiB, memory_bandwidth=900 * _GB, kind="cuda",
               peak_flops={"float64": 7.8e12, "float32": 15.7e12, "float16": 125e12},
               source="NVIDIA Tesla V100 GPU Datasheet, SXM2 column, https://images.nvidia.com/content/"
                      "technologies/volta/pdf/volta-v100-datasheet-update-us-1165301-r5.pdf"),
    DeviceSpec(name="A100-40GB", memory_bytes=40 * _GiB, memory_bandwidth=1555 * _GB, kind="cuda",
               peak_flops={"float64": 19.5e12, "float32": 19.5e12, "tf32": 156e12, "bfloat16": 312e12,
                           "float16": 312e12, "int8": 624e12},
               source=f"NVIDIA A100 Tensor Core GPU Datasheet, A100 40GB SXM column, {_A100_PDF}; {_SPARSE}"),
    DeviceSpec(name="A100-80GB", memory_bytes=80 * _GiB, memory_bandwidth=2039 * _GB, kind="cuda",
               peak_flops={"float64": 19.5e12, "float32": 19.5e12, "tf32": 156e12, "bfloat16": 312e12,
                           "float16": 312e12, "int8": 624e12},
               source=f"NVIDIA A100 Tensor Core GPU Datasheet, A100 80GB SXM column, {_A100_PDF}; {_SPARSE}"),
    DeviceSpec(name="H100-80GB", memory_bytes=80 * _GiB, memory_bandwidth=3350 * _GB, kind="cuda",
               peak_flops={"float64": 67e12, "float32": 67e12, "tf32": 494.5e12, "bfloat16": 989.5e12,
                           "float16": 989.5e12, "float8": 1979e12, "int8": 1979e12},
               source="NVIDIA H100 Tensor Core GPU Datasheet, H100 SXM column, https://resources.nvidia.com/"
                      f"en-us-tensor-core/nvidia-tensor-core-gpu-datasheet; {_SPARSE}"),
    DeviceSpec(name="H200-141GB", memory_bytes=141 * _GiB, memory_bandwidth=4800 * _GB, kind="cuda",
               peak_flops={"float64": 67e12, "float32": 67e12, "tf32": 494.5e12, "bfloat16": 989.5e12,
                           "float16": 989.5e12, "float8": 1979e12, "int8": 1979e12},
               source="NVIDIA H200 Tensor Core GPU product brief / datasheet, H200 SXM column, "
                      f"https://www.nvidia.com/en-us/data-center/h200/; {_SPARSE}"),
    DeviceSpec(name="L4", memory_bytes=24 * _GiB, memory_bandwidth=300 * _GB, kind="cuda",
               peak_flops={"float64": 30.3e12 / 64, "float32": 30.3e12, "tf32": 60e12, "bfloat16": 121e12,
                           "float16": 121e12, "float8": 242.5e12, "int8": 242.5e12},
               source="NVIDIA L4 Tensor Core GPU Datasheet, https://www.nvidia.com/en-us/data-center/l4/; "
                      f"{_SPARSE}; FP64 = FP32/64 per the NVIDIA Ada GPU Architecture whitepaper"),
    DeviceSpec(name="T4", memory_bytes=16 * _GiB, memory_bandwidth=320 * _GB, kind="cuda",
               peak_flops={"float64": 8.1e12 / 32, "float32": 8.1e12, "float16": 65e12, "int8": 130e12},
               source="NVIDIA T4 Tensor Core GPU Datasheet, https://www.nvidia.com/en-us/data-center/tesla-t4/; "
                      "FP64 = FP32/32 per the NVIDIA Turing GPU Architecture whitepaper"),
    DeviceSpec(name="MI300X", memory_bytes=192 * _GiB, memory_bandwidth=5300 * _GB, kind="rocm",
               peak_flops={"float64": 163.4e12, "float32": 163.4e12, "tf32": 653.7e12, "bfloat16": 1307.4e12,
                           "float16": 1307.4e12, "float8": 2614.9e12, "int8": 2614.9e12},
               source="AMD Instinct MI300X Accelerator data sheet, https://www.amd.com/content/dam/amd/en/"
                      "documents/instinct-tech-docs/data-sheets/amd-instinct-mi300x-data-sheet.pdf "
                      "(dense matrix figures)"),
    DeviceSpec(name="cpu", memory_bytes=16 * _GiB, memory_bandwidth=50 * _GB, kind="cpu",
               peak_flops={"float64": 0.5e12, "float32": 1.0e12},
               source="generic figure, no datasheet: 16 cores x 2 AVX2 FMA units x 8 fp32 lanes x 2 FLOP x 2 GHz"),
)})

LINK_PRESETS: Mapping[str, Link] = MappingProxyType({link.name: link for link in (
    Link(name="nvlink2", bandwidth=150 * _GB, latency_s=3e-6),
    Link(name="nvlink3", bandwidth=300 * _GB, latency_s=3e-6),
    Link(name="nvlink4", bandwidth=450 * _GB, latency_s=3e-6),
    Link(name="xgmi", bandwidth=64 * _GB, latency_s=3e-6),
    Link(name="pcie3", bandwidth=12 * _GB, latency_s=5e-6),
    Link(name="pcie4", bandwidth=25 * _GB, latency_s=5e-6),
    Link(name="loopback", bandwidth=5 * _GB, latency_s=20e-6),
    Link(name="ib-edr", bandwidth=12.5 * _GB, latency_s=5e-6),
    Link(name="ib-hdr", bandwidth=25 * _GB, latency_s=5e-6),
    Link(name="ib-ndr", bandwidth=50 * _GB, latency_s=5e-6),
    Link(name="ethernet-100g", bandwidth=12.5 * _GB, latency_s=20e-6),
    Link(name="ethernet-10g", bandwidth=1.25 * _GB, latency_s=50e-6),
)})

# (intra-machine, inter-machine) link per preset name, then per kind for specs that are not presets.
_DEFAULT_LINKS: Mapping[str, tuple[str, str]] = MappingProxyType({
    "V100-32GB": ("nvlink2", "ib-edr"), "A100-40GB": ("nvlink3", "ib-hdr"), "A100-80GB": ("nvlink3", "ib-hdr"),
    "H100-80GB": ("nvlink4", "ib-ndr"), "H200-141GB": ("nvlink4", "ib-ndr"), "L4": ("pcie4", "ethernet-100g"),
    "T4": ("pcie3", "ethernet-100g"), "MI300X": ("xgmi", "ib-ndr"), "cpu": ("loopback", "ethernet-10g"),
    "cuda": ("pcie4", "ethernet-100g"), "rocm": ("pcie4", "ethernet-100g"),
})


def default_link(specs: Sequence[DeviceSpec], *, inter: bool = False) -> Link:
    """The default intra-machine (or, with ``inter=True``, inter-machine) link for these devices.

    A mixed set gets the slowest of its members' defaults: a transfer is as fast as its slower end.
    """
    candidates = [LINK_PRESETS[_DEFAULT_LINKS.get(spec.name, _DEFAULT_LINKS[spec.kind])[inter]] for spec in specs]
    if not candidates:
        raise ClusterError("default_link() needs at least one DeviceSpec")
    return min(candidates, key=lambda link: (link.bandwidth, -link.latency_s))


def get_preset(name: str) -> DeviceSpec:
    """The preset called ``name``, case-insensitively; a bare family name ("h100") works if unambiguous.

    Raises:
        DeviceSpecError: unknown or ambiguous name; the message lists the presets and the closest one.
    """
    if not isinstance(name, str):
        raise DeviceSpecError(f"device preset name {name!r} is not a string; expected one of {', '.join(PRESETS)}")
    key = re.sub(r"[\s_]+", "-", name.strip()).casefold()  # "h100 80gb" and "H100_80GB" name the preset too
    by_key = {preset.casefold(): preset for preset in PRESETS}
    if key in by_key:
        return PRESETS[by_key[key]]
    family = [preset for preset in PRESETS if preset.split("-")[0].casefold() == key]
    if len(family) == 1:
        return PRESETS[family[0]]
    known = ", ".join(PRESETS)
    if family:
        raise DeviceSpecError(f'device preset "{name}" is ambiguous: it could be {" or ".join(family)}; '
                              f"name one of them. Known presets: {known}")
    close = difflib.get_close_matches(key, list(by_key), n=1, cutoff=0.5)
    hint = f'; did you mean "{by_key[close[0]]}"?' if close else "."
    raise DeviceSpecError(f'unknown device preset "{name}"{hint} Known presets: {known}')


def host_memory_bytes() -> int:
    """Memory this process may use on this machine: physical RAM, capped by a cgroup limit."""
    try:
        import psutil

        total = int(psutil.virtual_memory().total)
    except ImportError:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = PRESETS["cpu"].memory_bytes
    # Inside a container the cgroup limit, not the host's RAM, is what the OOM killer enforces.
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as file:
                limit = file.read().strip()
        except OSError:
            continue
        if limit.isdigit() and 0 < int(limit) < total:
            total = int(limit)
    return total


# Nominal figures for this machine's CPU; there is no datasheet to read them from (docs/devices.md).
_CPU_FP32_FLOP_PER_CYCLE = 32  # 2 AVX2 FMA units x 8 FP32 lanes x 2 FLOP, per core
_CPU_NOMINAL_HZ = 2.5e9
_CPU_BANDWIDTH_PER_CORE, _CPU_BANDWIDTH_CAP = 10 * _GB, 100 * _GB


def _cpu_cores() -> int:
    """Cores this process may run on: its affinity mask where the OS has one, else all of them."""
    try:
        return len(os.sched_getaffinity(0)) or os.cpu_count() or 1
    except (AttributeError, OSError):  # no sched_getaffinity on macOS and Windows
        return os.cpu_count() or 1


def local_cpu_spec(*, devices: int = 1) -> DeviceSpec:
    """This machine's CPU as one of ``devices`` CPU devices, which share the host memory evenly.

    Named ``"cpu"`` like the generic preset (so link defaults and cost factors keyed on it
    apply), with figures from this machine's core count: FP32 peak = cores x 32 FLOP/cycle x a
    nominal 2.5 GHz, FP64 half that, memory bandwidth 10 GB/s per core up to 100 GB/s. The clock
    and bandwidth are nominal, not measured; docs/devices.md gives the reasoning.

    Raises:
        DeviceSpecError: ``devices`` is not a positive integer.

    Example::

        local_cpu_spec(devices=2).memory_bytes == host_memory_bytes() // 2
    """
    count = _positive_int(devices, "local_cpu_spec devices", DeviceSpecError)
    cores = _cpu_cores()
    fp32 = cores * _CPU_FP32_FLOP_PER_CYCLE * _CPU_NOMINAL_HZ
    return DeviceSpec(name="cpu", kind="cpu", memory_bytes=max(1, host_memory_bytes() // count),
                      peak_flops={"float64": fp32 / 2, "float32": fp32},
                      memory_bandwidth=min(cores * _CPU_BANDWIDTH_PER_CORE, _CPU_BANDWIDTH_CAP),
                      source=f"this machine, nominal: {cores} cores x 32 FP32 FLOP/cycle (2 AVX2 FMA x 8 lanes x 2) "
                             "x 2.5 GHz, 10 GB/s of memory bandwidth per core up to 100 GB/s; see docs/devices.md")


_GPU_NAMES = (
    (re.compile(r"\bH200\b", re.IGNORECASE), "H200-141GB"),
    (re.compile(r"\bH100\b(?!.*\b(PCIe|NVL)\b)", re.IGNORECASE), "H100-80GB"),  # PCIe and NVL parts are slower
    (re.compile(r"\bA100\b", re.IGNORECASE), "A100"),
    (re.compile(r"\bV100\b", re.IGNORECASE), "V100-32GB"),
    (re.compile(r"\bL4\b", re.IGNORECASE), "L4"),
    (re.compile(r"\bT4\b", re.IGNORECASE), "T4"),
    (re.compile(r"\bMI300X\b", re.IGNORECASE), "MI300X"),
)


def local_gpu_spec(index: int) -> DeviceSpec:
    """The spec of local GPU ``index``: a preset with the card's real memory, or a conservative estimate.

    Known names map to presets as listed in docs/devices.md ("Local GPUs").
    """
    props = torch.cuda.get_device_properties(index)
    name, memory = str(props.name), int(props.total_memory)
    for pattern, preset in _GPU_NAMES:
        if pattern.search(name):
            if preset == "A100":
                preset = "A100-80GB" if memory > 48 * _GiB else "A100-40GB"
            return PRESETS[preset].with_memory(memory)
    # Unknown card: 64 FP32 lanes x 2 FLOP x 1 GHz per SM undercuts every NVIDIA part since Pascal;
    # an underestimate only makes the planner cautious, an overestimate makes it overload the card.
    fp32 = max(1, int(getattr(props, "multi_processor_count", 1))) * 128e9
    major = int(getattr(props, "major", 0))
    flops = {"float32": fp32}
    if major >= 7:
        flops["float16"] = 4 * fp32
    if major >= 8:
        flops["bfloat16"] = 4 * fp32
    return DeviceSpec(name=name, memory_bytes=memory, peak_flops=flops, memory_bandwidth=300 * _GB,
                      kind="rocm" if torch.version.hip else "cuda",
                      source="estimated from torch.cuda.get_device_properties; see docs/devices.md")


