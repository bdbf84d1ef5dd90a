"""Loading published partitioning instances as cost graphs.

The public instances of Tarnawski et al., "Efficient Algorithms for Device Placement of DNN
Graph Operators" (NeurIPS 2020) are JSON files: ``maxFPGAs`` devices of ``maxSizePerFPGA``
bytes, ``nodes`` with ``fpgaLatency``, ``size`` and ``colorClass`` (same colour, same
device), ``edges`` with ``cost`` (the same for every edge out of a node). Their objective is
this package's ``objective="direct"``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import networkx as nx

from fxshard.errors import PartitionError

__all__ = ["Instance", "load_tarnawski"]


@dataclasses.dataclass(frozen=True, eq=False)
class Instance:
    """A cost graph with the device count and memory it was published with."""

    name: str
    graph: nx.DiGraph
    k: int
    memory_limit: float


def load_tarnawski(path: str | Path) -> Instance:
    """Read one instance file into a cost graph (node ids are the file's ``id``s).

    Raises:
        PartitionError: the file is missing or not in that format.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        graph = nx.DiGraph()
        for node in data["nodes"]:
            graph.add_node(node["id"], compute=float(node["fpgaLatency"]), memory=float(node["size"]),
                           colocate=node.get("colorClass"), name=node.get("name", ""))
        for edge in data["edges"]:
            graph.add_edge(edge["sourceId"], edge["destId"], comm=float(edge["cost"]))
        return Instance(name=path.stem, graph=graph, k=int(data["maxFPGAs"]),
                        memory_limit=float(data["maxSizePerFPGA"]))
    except FileNotFoundError:
        raise PartitionError(f"no instance file at {path}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise PartitionError(f"{path} is not a Tarnawski et al. instance: {type(e).__name__}: {e}") from e
