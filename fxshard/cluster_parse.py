"""The ``devices`` argument read into a cluster's devices (grammar in docs/devices.md).

:func:`parse_devices` turns an int, a list of device strings or ``torch.device``s, or a cluster
string (``"2x8xH100-80GB"``, ``"4xcpu:2GB"``) into :class:`Device` records in rank order;
:class:`fxshard.cluster.Cluster` adds the links between them.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fxshard.devices import DeviceSpec, _positive_int, get_preset, local_cpu_spec, local_gpu_spec, parse_bytes
from fxshard.errors import ClusterError, DeviceSpecError

__all__ = ["Device", "ParsedDevices", "devices_from_groups", "devices_from_list", "local_devices", "parse_devices"]

# A string like "99999x8xH100" must fail fast instead of building millions of objects.
_MAX_DEVICES = 1 << 16


def _index(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ClusterError(f"{what} = {value!r}; expected an integer >= 0")
    return value



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


@dataclass(frozen=True, kw_only=True)
class ParsedDevices:
    """A cluster's devices in rank order, and the specs its default links are chosen for."""

    devices: tuple[Device, ...]
    specs: tuple[DeviceSpec, ...]


def parse_devices(devices: Any) -> ParsedDevices:
    """The devices an int, a list of device strings or ``torch.device``s, or a cluster string names.

    Raises:
        DeviceSpecError: the argument is malformed or asks for devices this machine lacks.
    """
    if isinstance(devices, bool):
        raise DeviceSpecError(f"devices={devices!r} is a bool; expected a number of devices such as devices=2, "
                              "a list such as ['cuda:0', 'cuda:1'] or a cluster string such as '8xA100-80GB'")
    if isinstance(devices, numbers.Integral):
        return _from_count(int(devices))
    if isinstance(devices, torch.device):
        devices = [devices]
    if isinstance(devices, (list, tuple)):
        return devices_from_list(devices)
    if isinstance(devices, str):
        return _from_string(devices)
    raise DeviceSpecError(f"devices={devices!r:.80} ({type(devices).__name__}) is not understood; expected an "
                          "int, a list of device strings, a cluster string such as '8xA100-80GB', or a Cluster")


def local_devices() -> ParsedDevices:
    """This machine's devices: every CUDA device, else one CPU device with the host's cores and memory."""
    count = _cuda_count()
    if count:
        return devices_from_list([f"cuda:{i}" for i in range(count)])
    return devices_from_list(["cpu"])


def devices_from_groups(groups: Sequence[tuple[int, int, DeviceSpec]], text: str) -> ParsedDevices:
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
    return ParsedDevices(devices=tuple(devices), specs=tuple(spec for _, _, spec in groups))


def _from_count(count: int) -> ParsedDevices:
    if count <= 0:
        raise DeviceSpecError(f"devices={count}: expected a positive number of devices, such as devices=2")
    available = _cuda_count()
    if available:
        if count > available:
            raise DeviceSpecError(f"devices={count}, but this machine has {available} CUDA devices; pass "
                                  f"devices={available} or fewer, or a preset string such as '{count}xH100-80GB' "
                                  "to plan for hardware you don't have")
        return devices_from_list([f"cuda:{i}" for i in range(count)])
    return devices_from_list(["cpu"] * count)


def devices_from_list(items: Sequence[Any]) -> ParsedDevices:
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
    cpu_spec = local_cpu_spec(devices=cpus) if cpus else None
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
            spec, torch_device = local_gpu_spec(index), f"cuda:{index}"
        devices.append(Device(index=position, machine=0, local_index=position, spec=spec, torch_device=torch_device))
    return ParsedDevices(devices=tuple(devices), specs=tuple({device.spec: None for device in devices}))


_COUNT_RE = re.compile(r"\s*([+-]?\d*\.?\d+)\s*[xX]\s*", re.ASCII)
_TORCH_DEVICE_RE = re.compile(r"cuda(:\d+)?|cpu:\d+", re.IGNORECASE | re.ASCII)
_EXAMPLES = '"8xA100-80GB", "2x8xH100-80GB", "4xcpu:2GB" or "4xA100-80GB+4xV100-32GB"'


def _from_string(text: str) -> ParsedDevices:
    stripped = text.strip()
    if not stripped:
        raise DeviceSpecError(f'devices="{text}" is empty; expected a cluster string such as {_EXAMPLES}')
    if re.fullmatch(r"[0-9]+", stripped):
        return _from_count(int(stripped))
    if _TORCH_DEVICE_RE.fullmatch(stripped):
        return devices_from_list([stripped])
    groups = [_parse_term(term, text) for term in stripped.split("+")]
    return devices_from_groups(groups, f'"{text}"')


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
