"""How a bench hands back its result: the whole of it as indented JSON at its --out path, and a summary of it as one
JSON line on stdout."""

from __future__ import annotations

import json
from pathlib import Path


def write_result(path: str | Path, result: dict, summary: object = None) -> None:
    """Write ``result`` to ``path`` (making its folder if need be) and print ``summary``, or the whole result when
    there is none, so that a caller reads the figures it wants from one line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result if summary is None else summary))
