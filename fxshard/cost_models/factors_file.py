"""Fitted roofline factors in a file: calibrate once, plan many times.

``fxshard calibrate ... --save-factors FILE`` fits :class:`RooflineFactors` to a device's
measured kernels and writes them here; ``fxshard.plan(..., factors=FILE)`` (``--factors FILE``)
prices the presets the file names with them. A device the file does not name keeps its
datasheet factors, and the plan's reason says which did which. See docs/calibration.md
("Planning with fitted factors").

The file (version 1)::

    {"fxshard_factors": 1,
     "devices": {"cpu": {"matmul_eff": 0.12, "memory_eff": 0.3, "launch_overhead_s": 2.5e-06,
                         "conv_tf32": false,
                         "provenance": {"model": "gpt2", "device": "cpu", "torch": "2.13.0",
                                        "date": "2026-11-27T19:51:20+00:00", "kernels": 412,
                                        "median_log_error_before": 1.2,
                                        "median_log_error_after": 0.4}}}}
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fxshard.cost_models.analytical import AnalyticalCostModel, RooflineFactors
from fxshard.errors import CostModelError

__all__ = ["FACTORS_VERSION", "FittedFactors", "load_factors"]

FACTORS_VERSION = 1
_FIELDS = ("matmul_eff", "memory_eff", "launch_overhead_s")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FittedFactors:
    """Roofline factors per device preset name, with where each came from.

    Attributes:
        factors: preset name (``DeviceSpec.name``: "cpu", "H100-80GB") -> its fitted factors.
        provenance: preset name -> how they were fitted (model, device, torch, date, kernels,
            median |log error| before and after the fit).
        source: the file they were read from ("" when built in memory).

    Example::

        fitted = FittedFactors.load("cpu.factors.json")
        plan = fxshard.plan(model, "4xcpu:3GB", (x,), factors=fitted)   # or factors="cpu.factors.json"
    """

    factors: Mapping[str, RooflineFactors]
    provenance: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        where = f" in {self.source}" if self.source else ""
        if not self.factors:
            raise CostModelError(f"the factors file{where} names no device; write one with "
                                 f"'fxshard calibrate MODEL --devices ... --save-factors FILE'")
        _check_presets(self.factors, where)
        object.__setattr__(self, "factors", dict(sorted(self.factors.items())))
        object.__setattr__(self, "provenance", {k: dict(v) for k, v in sorted(self.provenance.items())})

    def cost_model(self) -> AnalyticalCostModel:
        """The analytical cost model with these factors for the presets named, datasheet factors elsewhere."""
        return AnalyticalCostModel(by_preset=self.factors)

    def merged(self, other: FittedFactors) -> FittedFactors:
        """These factors with ``other``'s added (``other`` wins where both name a preset)."""
        return FittedFactors(factors={**self.factors, **other.factors},
                             provenance={**self.provenance, **other.provenance}, source=self.source)

    def describe(self, presets: Iterable[str] | None = None) -> str:
        """One line for a plan's reason: which presets were priced with these factors (and from
        where), and which of ``presets`` kept their datasheet factors."""
        names = sorted(set(presets)) if presets is not None else list(self.factors)
        used = [n for n in names if n in self.factors]
        kept = [n for n in names if n not in self.factors]
        where = f" from {self.source}" if self.source else ""
        parts = []
        if used:
            parts.append(f"priced with fitted roofline factors{where} for "
                         + ", ".join(f"{n} (matmul_eff={self.factors[n].matmul_eff:.3g}, memory_eff="
                                     f"{self.factors[n].memory_eff:.3g}, launch_overhead_s="
                                     f"{self.factors[n].launch_overhead_s:.3g})" for n in used))
        if kept:
            parts.append(f"{', '.join(kept)} kept datasheet factors ({self.source or 'the fitted factors'} "
                         f"name only {', '.join(self.factors)})")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        devices = {}
        for name, f in self.factors.items():
            devices[name] = {"matmul_eff": f.matmul_eff, "memory_eff": f.memory_eff,
                             "launch_overhead_s": f.launch_overhead_s, "conv_tf32": f.conv_tf32,
                             "provenance": dict(self.provenance.get(name, {}))}
        return {"fxshard_factors": FACTORS_VERSION, "devices": devices}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | os.PathLike) -> None:
        """Write the factors file (JSON) to ``path``."""
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "") -> FittedFactors:
        """Read the :meth:`to_dict` form.

        Raises:
            CostModelError: another version, a missing or out-of-range factor, an unknown preset.
        """
        where = f" in {source}" if source else ""
        if not isinstance(data, Mapping) or "fxshard_factors" not in data:
            raise CostModelError(f"{source or 'the data'} is not an fxshard factors file (no 'fxshard_factors' "
                                 f"version key); write one with 'fxshard calibrate MODEL --devices ... "
                                 f"--save-factors FILE'")
        version = data["fxshard_factors"]
        if isinstance(version, bool) or version != FACTORS_VERSION:
            raise CostModelError(f"factors file version {version!r}{where}; this fxshard reads version "
                                 f"{FACTORS_VERSION}. Re-run 'fxshard calibrate ... --save-factors FILE' with it")
        devices = data.get("devices")
        if not isinstance(devices, Mapping):
            raise CostModelError(f"'devices'{where} must map preset names to factors, got {devices!r}")
        factors, provenance = {}, {}
        for name, entry in devices.items():
            if not isinstance(entry, Mapping):
                raise CostModelError(f"device {name!r}{where}: expected an object with {', '.join(_FIELDS)}, "
                                     f"got {entry!r}")
            missing = [k for k in _FIELDS if k not in entry]
            if missing:
                raise CostModelError(f"device {name!r}{where} lacks {', '.join(missing)}; each device needs "
                                     f"{', '.join(_FIELDS)} (re-run 'fxshard calibrate ... --save-factors FILE')")
            try:
                factors[name] = RooflineFactors(matmul_eff=entry["matmul_eff"], memory_eff=entry["memory_eff"],
                                                launch_overhead_s=entry["launch_overhead_s"],
                                                conv_tf32=bool(entry.get("conv_tf32", False)))
            except CostModelError as e:
                raise CostModelError(f"device {name!r}{where}: {e}") from e
            prov = entry.get("provenance") or {}
            if not isinstance(prov, Mapping):
                raise CostModelError(f"device {name!r}{where}: 'provenance' must be an object (model, device, torch, "
                                     f"date, ...), got {prov!r}; re-run 'fxshard calibrate ... --save-factors FILE'")
            provenance[name] = dict(prov)
        return cls(factors=factors, provenance=provenance, source=source)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FittedFactors:
        """Read a factors file.

        Raises:
            CostModelError: the file is missing, not JSON, or not a valid factors file (what is
                wrong, and how to write a good one).
        """
        source = os.fspath(path)
        try:
            text = Path(source).read_text()
        except OSError as e:
            raise CostModelError(f"cannot read the factors file {source}: {e.strerror or e}; write it with "
                                 f"'fxshard calibrate MODEL --devices ... --save-factors {source}'") from e
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise CostModelError(f"the factors file {source} is not JSON ({e.msg} at line {e.lineno}); write it "
                                 f"with 'fxshard calibrate MODEL --devices ... --save-factors {source}'") from e
        return cls.from_dict(data, source=source)


def load_factors(factors: str | os.PathLike | FittedFactors) -> FittedFactors:
    """``factors`` as :class:`FittedFactors`: read from the file it names, or as it is."""
    if isinstance(factors, FittedFactors):
        return factors
    if not isinstance(factors, (str, os.PathLike)):
        raise CostModelError(f"factors={factors!r}; pass the path of a factors file (written by 'fxshard "
                             f"calibrate ... --save-factors FILE') or a FittedFactors")
    return FittedFactors.load(factors)


def _check_presets(factors: Mapping[str, RooflineFactors], where: str) -> None:
    from fxshard.devices import PRESETS

    for name in factors:
        if name not in PRESETS:
            close = difflib.get_close_matches(str(name), list(PRESETS), 1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise CostModelError(f"unknown device preset {name!r}{where}; {hint}factors apply to presets by name: "
                                 f"{', '.join(PRESETS)}")
