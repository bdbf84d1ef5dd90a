"""Clusters: devices in rank order, machine by machine, the links between them, and the ``devices`` argument.

Device specs, presets, links and byte sizes live in :mod:`fxshard.devices`; this module re-exports
them, so ``from fxshard.cluster import DeviceSpec, PRESETS`` keeps working. The ``devices`` argument
is read into devices by :mod:`fxshard.cluster_parse` (its grammar in ``docs/devices.md``).
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fxshard.cluster_parse import Device, ParsedDevices, devices_from_groups, local_devices, parse_devices
from fxshard.devices import (
    DTYPE_KEYS,
    LINK_PRESETS,
    PRESETS,
    SELF_LINK,
    DeviceKind,
    DeviceSpec,
    Link,
    _check_fields,
    default_link,
    format_budget,
    format_bytes,
    get_preset,
    host_memory_bytes,
    parse_bytes,
)
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
        return cls._linked(devices_from_groups([(machines, devices_per_machine, spec)], repr(spec.name)), intra_link,
                           inter_link)

    @classmethod
    def local(cls, *, intra_link: Link | None = None, inter_link: Link | None = None) -> Cluster:
        """This machine: every CUDA device, else one CPU device with the host's cores and memory (:func:`local_cpu_spec`)."""
        return cls._linked(local_devices(), intra_link, inter_link)

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
        return cls._linked(parse_devices(devices), intra_link, inter_link)

    @classmethod
    def _linked(cls, parsed: ParsedDevices, intra_link: Link | None, inter_link: Link | None) -> Cluster:
        """A cluster of the parsed devices, with the default links for their specs unless given."""
        specs = list(parsed.specs)
        return cls(devices=parsed.devices, intra_link=intra_link or default_link(specs),
                   inter_link=inter_link or default_link(specs, inter=True))


def _label(spec: DeviceSpec) -> str:
    """The cluster-string term for one spec: its name, with a memory suffix where that differs from the preset's.

    A spec that differs from its preset in more than memory (a local CPU's own figures) writes the
    same: the text parses back to the preset's figures. The suffix is left out when it would parse
    to the preset's own memory, so describing the parsed text gives the same text.
    """
    preset = PRESETS.get(spec.name)
    if preset is None or spec.memory_bytes == preset.memory_bytes:
        return spec.name
    budget = format_budget(spec.memory_bytes)
    return spec.name if parse_bytes(budget) == preset.memory_bytes else f"{spec.name}:{budget}"


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
