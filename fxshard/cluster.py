"""Device specs, presets, links and clusters: the hardware a plan is made for.

The preset figures, their datasheets, the link defaults and the grammar of the ``devices``
argument are documented in ``docs/devices.md``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import numbers
import operator
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from types import MappingProxyType
from typing import Any, Literal

import torch

from fxshard.errors import ClusterError, DeviceSpecError

__all__ = [
    "DTYPE_KEYS",
    "LINK_PRESETS",
    "PRESETS",
    "SELF_LINK",
    "Cluster",
    "Device",
    "DeviceKind",
    "DeviceSpec",
    "Link",
    "default_link",
    "format_bytes",
    "get_preset",
    "host_memory_bytes",
    "parse_bytes",
]

DeviceKind = Literal["cuda", "rocm", "cpu"]
DTYPE_KEYS: tuple[str, ...] = ("float64", "float32", "tf32", "bfloat16", "float16", "float8", "int8")
_KINDS = ("cuda", "rocm", "cpu")
# A string like "99999x8xH100" must fail fast instead of building millions of objects.
_MAX_DEVICES = 1 << 16


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


def _index(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ClusterError(f"{what} = {value!r}; expected an integer >= 0")
    return value


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


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_UNIT_NAMES = "B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)"
_SIZE_RE = re.compile(r"\s*(\d+\.?\d*|\.\d+)\s*([A-Za-z]*)\s*", re.ASCII)


def parse_bytes(text: str) -> int:
    """Parse a byte size such as ``"2GB"`` (2e9), ``"1.5GiB"`` or ``"512MiB"``; a bare number is bytes.

    Raises:
        DeviceSpecError: not a non-negative number with a known unit.
    """
    if not isinstance(text, str):
        raise DeviceSpecError(f"byte size {text!r} is not a string; expected text such as '2GB' or '512MiB'")
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise DeviceSpecError(f'bad byte size "{text}": expected a non-negative number and a unit, '
                              f'such as "2GB", "1.5GiB" or "512MiB"; units: {_UNIT_NAMES}')
    unit = match[2].casefold() or "b"
    if unit not in _UNITS:
        raise DeviceSpecError(f'bad byte size "{text}": unknown unit "{match[2]}"; expected {_UNIT_NAMES}')
    # Fraction keeps "1.1GB" exact; a fraction of a byte rounds down.
    return int(Fraction(match[1]) * _UNITS[unit])


def format_bytes(n: float) -> str:
    """Human-readable size in binary units, e.g. ``"80.0 GiB"``."""
    if isinstance(n, bool) or not isinstance(n, numbers.Real) or math.isnan(n):
        raise DeviceSpecError(f"format_bytes({n!r}): expected a number of bytes")
    sign, value = ("-" if n < 0 else ""), abs(float(n))
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    step = 0
    while value >= 1024 and step < len(units) - 1:
        value, step = value / 1024, step + 1
    return f"{sign}{value:.0f} B" if step == 0 else f"{sign}{value:.1f} {units[step]}"


def _exact_size(n: int) -> str:
    """The shortest exact size string for ``n`` bytes, parseable by :func:`parse_bytes`."""
    for unit, size in sorted(((u, s) for u, s in _UNITS.items() if s > 1), key=lambda item: -item[1]):
        if n % size == 0:
            return f"{n // size}{unit[0].upper()}{unit[1:-1]}{unit[-1].upper()}"
    return f"{n}B"


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


_GPU_NAMES = (
    (re.compile(r"\bH200\b", re.I), "H200-141GB"),
    (re.compile(r"\bH100\b(?!.*\b(PCIe|NVL)\b)", re.I), "H100-80GB"),  # PCIe and NVL parts are slower
    (re.compile(r"\bA100\b", re.I), "A100"),
    (re.compile(r"\bV100\b", re.I), "V100-32GB"),
    (re.compile(r"\bL4\b", re.I), "L4"),
    (re.compile(r"\bT4\b", re.I), "T4"),
    (re.compile(r"\bMI300X\b", re.I), "MI300X"),
)


def _cuda_spec(index: int) -> DeviceSpec:
    """The spec of local GPU ``index``: a preset with the card's real memory, or a conservative estimate."""
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


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _no_cuda(requested: str) -> DeviceSpecError:
    return DeviceSpecError(f"devices={requested} asks for CUDA, but this machine has no CUDA device "
                           f"(torch.cuda.is_available() is False); use CPU devices (devices=['cpu', 'cpu'] "
                           "or devices=2), or a preset string such as '2xA100-80GB' to plan for GPUs you don't have")


@dataclass(frozen=True, kw_only=True)
class Device:
    """One device of a cluster: its rank-order index, machine, index on the machine, spec and torch device."""

    index: int
    machine: int
    local_index: int
    spec: DeviceSpec
    torch_device: str

    def __post_init__(self) -> None:
        for field in ("index", "machine", "local_index"):
            _index(getattr(self, field), f"Device {field}")
        if not isinstance(self.spec, DeviceSpec):
            raise ClusterError(f"Device {self.index} spec = {self.spec!r:.80}; expected a DeviceSpec")
        if not isinstance(self.torch_device, str) or not self.torch_device:
            raise ClusterError(f"Device {self.index} torch_device = {self.torch_device!r}; expected 'cuda:N' or 'cpu'")


@dataclass(frozen=True, kw_only=True, repr=False)
class Cluster:
    """Devices in rank order, grouped machine by machine, and the links between them.

    ``local_index`` is a device's position among this cluster's devices on its machine (torchrun's
    LOCAL_RANK); ``torch_device`` is the physical device it runs on. Build one with :meth:`parse`.

    Example::

        cluster = Cluster.parse("2x8xH100-80GB")
        cluster.link(0, 8).transfer_time(1 << 30)  # over InfiniBand
    """

    devices: tuple[Device, ...]
    intra_link: Link
    inter_link: Link

    def __post_init__(self) -> None:
        if not isinstance(self.devices, (tuple, list)) or not self.devices:
            raise ClusterError(f"Cluster devices = {self.devices!r:.80}; expected a non-empty tuple of Device")
        object.__setattr__(self, "devices", tuple(self.devices))
        machine, local = 0, 0
        for position, device in enumerate(self.devices):
            if not isinstance(device, Device):
                raise ClusterError(f"Cluster devices[{position}] = {device!r:.80}; expected a Device")
            if position and device.machine == machine + 1:
                machine, local = machine + 1, 0
            if (device.index, device.machine, device.local_index) != (position, machine, local):
                raise ClusterError(
                    f"Cluster devices[{position}] has (index, machine, local_index) = "
                    f"({device.index}, {device.machine}, {device.local_index}); expected ({position}, {machine}, "
                    f"{local}) or the next machine: devices go in rank order, machine by machine, numbered from 0")
            local += 1
        for field in ("intra_link", "inter_link"):
            if not isinstance(getattr(self, field), Link):
                raise ClusterError(f"Cluster {field} = {getattr(self, field)!r:.80}; expected a Link")

    def __repr__(self) -> str:
        return f"Cluster({self.describe()!r}, intra_link={self.intra_link!r}, inter_link={self.inter_link!r})"

    @property
    def num_devices(self) -> int:
        """Number of devices."""
        return len(self.devices)

    @property
    def num_machines(self) -> int:
        """Number of machines."""
        return self.devices[-1].machine + 1

    @property
    def is_homogeneous(self) -> bool:
        """True when every device has the same spec (machines may hold different numbers of them)."""
        return all(device.spec == self.devices[0].spec for device in self.devices)

    def devices_on(self, machine: int) -> tuple[Device, ...]:
        """The devices of one machine, in local order."""
        return tuple(device for device in self.devices if device.machine == machine)

    def _check_index(self, index: Any) -> int:
        # numbers.Integral: partitioners hand back numpy integers as often as Python ones.
        if isinstance(index, bool) or not isinstance(index, numbers.Integral) or not 0 <= index < self.num_devices:
            raise ClusterError(f"device index {index!r} is out of range: this cluster ({self.describe()}) has "
                               f"{self.num_devices} devices, indexed 0..{self.num_devices - 1}")
        return int(index)

    def link(self, a: int, b: int) -> Link:
        """The link from device ``a`` to device ``b``: intra- or inter-machine, or free when ``a == b``.

        Raises:
            ClusterError: an index is out of range.
        """
        a, b = self._check_index(a), self._check_index(b)
        if a == b:
            return SELF_LINK
        return self.intra_link if self.devices[a].machine == self.devices[b].machine else self.inter_link

    def subset(self, indices: Sequence[int]) -> Cluster:
        """The cluster of the chosen devices, renumbered in this cluster's rank order, links unchanged.

        Raises:
            ClusterError: no indices, a repeated one, or one out of range.
        """
        chosen = sorted(self._check_index(index) for index in indices)
        if not chosen:
            raise ClusterError(f"subset([]) of {self.describe()}: expected at least one device index")
        if len(set(chosen)) != len(chosen):
            raise ClusterError(f"subset({list(indices)}) repeats a device index; give each device once")
        devices: list[Device] = []
        machines: dict[int, int] = {}
        locals_: dict[int, int] = {}
        for index in chosen:
            old = self.devices[index]
            machine = machines.setdefault(old.machine, len(machines))
            local = locals_[machine] = locals_.get(machine, -1) + 1
            devices.append(dataclasses.replace(old, index=len(devices), machine=machine, local_index=local))
        return dataclasses.replace(self, devices=tuple(devices))

    def describe(self) -> str:
        """Short text: ``"2x8xH100-80GB"``, ``"4xA100-80GB+4xV100-32GB"``, or a per-machine list."""
        machines: list[list[Device]] = [[] for _ in range(self.num_machines)]
        for device in self.devices:  # one pass: describe() appears in error messages of huge clusters
            machines[device.machine].append(device)
        if any(len({device.spec for device in devices}) > 1 for devices in machines):
            return "; ".join(f"machine {m}: " + ", ".join(f"{count}x{_label(spec)}" for count, spec in _runs(devices))
                             for m, devices in enumerate(machines))
        terms = []
        for count, (per_machine, spec) in _runs([(len(devices), devices[0].spec) for devices in machines], key=None):
            prefix = f"{count}x{per_machine}x" if count > 1 else (f"{per_machine}x" if per_machine > 1 else "")
            terms.append(prefix + _label(spec))
        return "+".join(terms)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form; each distinct spec is written once and devices refer to it by position."""
        specs = list(dict.fromkeys(device.spec for device in self.devices))
        position = {spec: i for i, spec in enumerate(specs)}
        return {
            "fxshard_cluster": 1,
            "intra_link": self.intra_link.to_dict(),
            "inter_link": self.inter_link.to_dict(),
            "specs": [spec.to_dict() for spec in specs],
            "devices": [{"index": d.index, "machine": d.machine, "local_index": d.local_index,
                         "torch_device": d.torch_device, "spec": position[d.spec]} for d in self.devices],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Cluster:
        """Rebuild a cluster from :meth:`to_dict` output.

        Raises:
            ClusterError: a field is missing, unknown or malformed; the message gives its path.
        """
        _check_fields(data, "cluster", ClusterError,
                      ("fxshard_cluster", "intra_link", "inter_link", "specs", "devices"))
        if data["fxshard_cluster"] != 1:
            raise ClusterError(f"cluster format version {data['fxshard_cluster']!r} is not supported; this fxshard "
                               "reads version 1 (was the file written by a newer fxshard?)")
        for field in ("specs", "devices"):
            if not isinstance(data[field], list):
                raise ClusterError(f"cluster {field} = {data[field]!r:.80}; expected a JSON list")
        try:
            specs = [DeviceSpec.from_dict(spec) for spec in data["specs"]]
        except DeviceSpecError as error:
            raise ClusterError(f"cluster specs: {error}") from error
        devices = []
        for position, item in enumerate(data["devices"]):
            _check_fields(item, f"cluster devices[{position}]", ClusterError,
                          ("index", "machine", "local_index", "torch_device", "spec"))
            spec = item["spec"]
            if isinstance(spec, bool) or not isinstance(spec, int) or not 0 <= spec < len(specs):
                raise ClusterError(f"cluster devices[{position}] spec = {spec!r}; expected an index into "
                                   f"specs (0..{len(specs) - 1})")
            devices.append(Device(**{**item, "spec": specs[spec]}))
        return cls(devices=tuple(devices), intra_link=Link.from_dict(data["intra_link"]),
                   inter_link=Link.from_dict(data["inter_link"]))

    def to_json(self) -> str:
        """JSON text; ``Cluster.from_json(c.to_json()) == c``."""
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Cluster:
        """Rebuild a cluster from :meth:`to_json` text.

        Raises:
            ClusterError: malformed JSON or fields.
        """
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as error:
            raise ClusterError(f"cluster JSON is malformed ({error}); "
                               "expected the text of Cluster.to_json()") from error
        return cls.from_dict(data)

    @classmethod
    def homogeneous(cls, spec: DeviceSpec, *, machines: int = 1, devices_per_machine: int = 1,
                    intra_link: Link | None = None, inter_link: Link | None = None) -> Cluster:
        """``machines`` x ``devices_per_machine`` devices of one spec, with default links unless given."""
        return _from_groups([(machines, devices_per_machine, spec)], intra_link, inter_link, repr(spec.name))

    @classmethod
    def local(cls, *, intra_link: Link | None = None, inter_link: Link | None = None) -> Cluster:
        """This machine: every CUDA device, else one CPU device with the host's memory."""
        count = _cuda_count()
        if count:
            return _from_devices([f"cuda:{i}" for i in range(count)], intra_link, inter_link)
        return _from_devices(["cpu"], intra_link, inter_link)

    @classmethod
    def parse(cls, devices: Any, *, intra_link: Link | None = None, inter_link: Link | None = None) -> Cluster:
        """Build a cluster from any form of the ``devices`` argument (grammar in docs/devices.md).

        Args:
            devices: an int N (N local devices), a list of device strings or ``torch.device``s,
                a cluster string (``"8xA100-80GB"``, ``"2x8xH100-80GB"``, ``"4xcpu:2GB"``,
                ``"4xA100-80GB+4xV100-32GB"``), or a Cluster (returned as is).
            intra_link, inter_link: override the default links.

        Raises:
            DeviceSpecError: the argument is malformed or asks for devices this machine lacks.

        Example::

            Cluster.parse("4xcpu:2GB").describe()  # '4xcpu:2GB'
        """
        if isinstance(devices, Cluster):
            overrides = {k: v for k, v in (("intra_link", intra_link), ("inter_link", inter_link)) if v is not None}
            return dataclasses.replace(devices, **overrides) if overrides else devices
        if isinstance(devices, bool):
            raise DeviceSpecError(f"devices={devices!r} is a bool; expected a number of devices such as devices=2, "
                                  "a list such as ['cuda:0', 'cuda:1'] or a cluster string such as '8xA100-80GB'")
        if isinstance(devices, numbers.Integral):
            return _from_count(int(devices), intra_link, inter_link)
        if isinstance(devices, torch.device):
            devices = [devices]
        if isinstance(devices, (list, tuple)):
            return _from_devices(devices, intra_link, inter_link)
        if isinstance(devices, str):
            return _from_string(devices, intra_link, inter_link)
        raise DeviceSpecError(f"devices={devices!r:.80} ({type(devices).__name__}) is not understood; expected an "
                              "int, a list of device strings, a cluster string such as '8xA100-80GB', or a Cluster")


def _label(spec: DeviceSpec) -> str:
    """The cluster-string term for one spec: its preset name, with a memory suffix if that was changed."""
    preset = PRESETS.get(spec.name)
    if preset is not None and spec != preset and spec == preset.with_memory(spec.memory_bytes):
        return f"{spec.name}:{_exact_size(spec.memory_bytes)}"
    return spec.name


def _runs(items: Sequence[Any], key: Any = "spec") -> list[tuple[int, Any]]:
    """Run-length encoding of ``items`` (or of their ``.spec``): ``[(count, value), ...]``."""
    runs: list[tuple[int, Any]] = []
    for item in items:
        value = getattr(item, key) if key else item
        if runs and runs[-1][1] == value:
            runs[-1] = (runs[-1][0] + 1, value)
        else:
            runs.append((1, value))
    return runs


def _from_groups(groups: Sequence[tuple[int, int, DeviceSpec]], intra_link: Link | None, inter_link: Link | None,
                 text: str) -> Cluster:
    """A cluster of machine groups ``(machines, devices per machine, spec)``, in order."""
    total = 0
    for machines, per_machine, _ in groups:
        _positive_int(machines, f"{text}: number of machines", DeviceSpecError)
        _positive_int(per_machine, f"{text}: devices per machine", DeviceSpecError)
        total += machines * per_machine
    if total > _MAX_DEVICES:
        raise DeviceSpecError(f"{text} describes {total:,} devices; at most {_MAX_DEVICES:,} are supported")
    devices: list[Device] = []
    machine = 0
    for machines, per_machine, spec in groups:
        for _ in range(machines):
            for local in range(per_machine):
                torch_device = "cpu" if spec.kind == "cpu" else f"cuda:{local}"
                devices.append(Device(index=len(devices), machine=machine, local_index=local, spec=spec,
                                      torch_device=torch_device))
            machine += 1
    specs = [spec for _, _, spec in groups]
    return Cluster(devices=tuple(devices), intra_link=intra_link or default_link(specs),
                   inter_link=inter_link or default_link(specs, inter=True))


def _from_count(count: int, intra_link: Link | None, inter_link: Link | None) -> Cluster:
    if count <= 0:
        raise DeviceSpecError(f"devices={count}: expected a positive number of devices, such as devices=2")
    available = _cuda_count()
    if available:
        if count > available:
            raise DeviceSpecError(f"devices={count}, but this machine has {available} CUDA devices; pass "
                                  f"devices={available} or fewer, or a preset string such as '{count}xH100-80GB' "
                                  "to plan for hardware you don't have")
        return _from_devices([f"cuda:{i}" for i in range(count)], intra_link, inter_link)
    return _from_devices(["cpu"] * count, intra_link, inter_link)


def _from_devices(items: Sequence[Any], intra_link: Link | None, inter_link: Link | None) -> Cluster:
    """One machine of the listed local devices; CPU entries share the host's memory evenly."""
    if not items:
        raise DeviceSpecError("devices=[] is empty; expected at least one device, such as ['cuda:0'] or ['cpu']")
    if len(items) > _MAX_DEVICES:
        raise DeviceSpecError(f"devices lists {len(items):,} devices; at most {_MAX_DEVICES:,} are supported")
    parsed: list[torch.device] = []
    for position, item in enumerate(items):
        if isinstance(item, str):
            try:
                item = torch.device(item.strip())
            except (RuntimeError, ValueError) as error:
                raise DeviceSpecError(f"devices[{position}] = {item!r} is not a torch device string; expected "
                                      "'cuda:N' or 'cpu' (a cluster string such as '4xcpu:2GB' goes alone, "
                                      "not in a list)") from error
        if not isinstance(item, torch.device):
            raise DeviceSpecError(f"devices[{position}] = {item!r:.80} ({type(item).__name__}) is not a device; "
                                  "expected a string such as 'cuda:0' or 'cpu', or a torch.device")
        if item.type not in ("cuda", "cpu"):
            raise DeviceSpecError(f"devices[{position}] = '{item}': device type '{item.type}' is not supported; "
                                  "expected 'cuda:N' or 'cpu'")
        parsed.append(item)
    available = _cuda_count()
    cpus = sum(device.type == "cpu" for device in parsed)
    cpu_spec = PRESETS["cpu"].with_memory(max(1, host_memory_bytes() // cpus)) if cpus else None
    devices: list[Device] = []
    seen: set[int] = set()
    for position, device in enumerate(parsed):
        if device.type == "cpu":
            spec, torch_device = cpu_spec, "cpu"
        else:
            if not available:
                raise _no_cuda(repr([str(d) for d in parsed]))
            index = torch.cuda.current_device() if device.index is None else device.index
            if index >= available:
                raise DeviceSpecError(f"devices[{position}] = 'cuda:{index}', but this machine has {available} CUDA "
                                      f"devices (cuda:0..cuda:{available - 1}); pick among those")
            if index in seen:
                raise DeviceSpecError(f"devices lists 'cuda:{index}' twice; list each GPU once")
            seen.add(index)
            spec, torch_device = _cuda_spec(index), f"cuda:{index}"
        devices.append(Device(index=position, machine=0, local_index=position, spec=spec, torch_device=torch_device))
    specs = list({device.spec: None for device in devices})
    return Cluster(devices=tuple(devices), intra_link=intra_link or default_link(specs),
                   inter_link=inter_link or default_link(specs, inter=True))


_COUNT_RE = re.compile(r"\s*([+-]?\d*\.?\d+)\s*[xX]\s*", re.ASCII)
_TORCH_DEVICE_RE = re.compile(r"cuda(:\d+)?|cpu:\d+", re.I | re.ASCII)
_EXAMPLES = '"8xA100-80GB", "2x8xH100-80GB", "4xcpu:2GB" or "4xA100-80GB+4xV100-32GB"'


def _from_string(text: str, intra_link: Link | None, inter_link: Link | None) -> Cluster:
    stripped = text.strip()
    if not stripped:
        raise DeviceSpecError(f'devices="{text}" is empty; expected a cluster string such as {_EXAMPLES}')
    if re.fullmatch(r"[0-9]+", stripped):
        return _from_count(int(stripped), intra_link, inter_link)
    if _TORCH_DEVICE_RE.fullmatch(stripped):
        return _from_devices([stripped], intra_link, inter_link)
    groups = [_parse_term(term, text) for term in stripped.split("+")]
    return _from_groups(groups, intra_link, inter_link, f'"{text}"')


def _parse_term(term: str, text: str) -> tuple[int, int, DeviceSpec]:
    """One ``[machines x][devices x]PRESET[:memory]`` term of a cluster string."""
    rest = term.strip()
    if not rest:
        raise DeviceSpecError(f'"{text}": empty term around "+"; expected terms joined by "+", such as {_EXAMPLES}')
    counts: list[int] = []
    while (match := _COUNT_RE.match(rest)) is not None:
        if not match[1].isdigit() or int(match[1]) <= 0:
            raise DeviceSpecError(f'"{text}": count "{match[1]}" in "{term.strip()}" must be a positive integer, '
                                  f'as in "8xH100-80GB"')
        counts.append(int(match[1]))
        rest = rest[match.end():]
    if len(counts) > 2:
        raise DeviceSpecError(f'"{text}": "{term.strip()}" has {len(counts)} counts; expected at most two '
                              '(machines x devices per machine), as in "2x8xH100-80GB"')
    name, colon, memory = rest.partition(":")
    if not name.strip():
        raise DeviceSpecError(f'"{text}": no device preset in "{term.strip()}"; expected a term such as "8xA100-80GB"')
    try:
        spec = get_preset(name)
    except DeviceSpecError as error:
        raise DeviceSpecError(f'"{text}": {error}') from error
    if colon:
        try:
            budget = parse_bytes(memory)
        except DeviceSpecError as error:
            raise DeviceSpecError(f'"{text}": memory budget: {error}') from error
        if budget <= 0:
            raise DeviceSpecError(f'"{text}": memory budget "{memory.strip()}" is 0 bytes; expected a positive '
                                  'size such as "4xcpu:2GB"')
        spec = spec.with_memory(budget)
    machines, per_machine = [(1, 1), (1, *counts), tuple(counts)][len(counts)]
    return machines, per_machine, spec
