"""The package's sizes at a git revision: modules over 450 lines, functions over 60, classes over
250 (the aims of docs/architecture.md), read with ``ast`` from ``git archive``.

    python benchmarks/code_sizes.py HEAD f68d8c9
"""

from __future__ import annotations

import argparse
import ast
import io
import subprocess
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sizes(rev: str) -> dict[str, list[tuple[int, str]]]:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "fxshard"], check=True,
                             capture_output=True).stdout
    found: dict[str, list[tuple[int, str]]] = {"modules": [], "functions": [], "classes": []}
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar.getmembers():
            if not member.name.endswith(".py"):
                continue
            source = tar.extractfile(member).read().decode()
            found["modules"].append((source.count("\n"), member.name))
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    kind = "classes" if isinstance(node, ast.ClassDef) else "functions"
                    found[kind].append((node.end_lineno - node.lineno + 1, f"{member.name}:{node.name}"))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revs", nargs="+", help="git revisions")
    for rev in parser.parse_args().revs:
        found = sizes(rev)
        lines = sum(n for n, _ in found["modules"])
        print(f"{rev}: {len(found['modules'])} modules, {lines} lines")
        for kind, limit in (("modules", 450), ("functions", 60), ("classes", 250)):
            over = sorted((x for x in found[kind] if x[0] > limit), reverse=True)
            print(f"  {kind} over {limit} lines: {len(over)}" + "".join(f"\n    {n:5d} {name}" for n, name in over))


if __name__ == "__main__":
    main()
