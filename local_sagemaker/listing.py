"""How the List* calls answer: the records their filters keep, sorted, one page at a time behind an opaque NextToken,
each cut to its summary."""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence

from local_sagemaker.protocol import ValidationException

DEFAULT_MAX_RESULTS = 10


def _token(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"offset": offset}).encode()).decode()


def _offset(token: str) -> int:
    try:
        offset = json.loads(base64.urlsafe_b64decode(token.encode()))["offset"]
        if isinstance(offset, int) and offset >= 0:
            return offset
    except (ValueError, KeyError, TypeError):
        pass
    raise ValidationException(f"Invalid pagination token {token!r}")


TIME_FILTERS = (
    ("CreationTimeAfter", "CreationTime", True),
    ("CreationTimeBefore", "CreationTime", False),
    ("LastModifiedTimeAfter", "LastModifiedTime", True),
    ("LastModifiedTimeBefore", "LastModifiedTime", False),
)


def filtered(records: list[dict], params: dict, name_key: str, status_key: str | None = None) -> list[dict]:
    """The records a List call's filters keep: NameContains (case-insensitive), StatusEquals, and the creation and
    modification time bounds."""
    if contains := params.get("NameContains"):
        records = [r for r in records if contains.lower() in r[name_key].lower()]
    if status_key and (status := params.get("StatusEquals")):
        records = [r for r in records if r[status_key] == status]
    for key, field, after in TIME_FILTERS:
        if key in params:
            records = [r for r in records if field in r and (r[field] > params[key]) == after]
    return records


def page(
    records: list[dict], params: dict, sort_by: dict[str, str], default_sort: str, default_order: str = "Ascending"
) -> tuple[list[dict], str | None]:
    """One page of ``records``, sorted by ``params["SortBy"]`` (a key of ``sort_by``: API name → record field) and
    ``SortOrder``; returns the page and the next token (None on the last page)."""
    field = sort_by[params.get("SortBy") or default_sort]
    descending = (params.get("SortOrder") or default_order) == "Descending"
    ordered = sorted(records, key=lambda record: (record.get(field) is None, record.get(field)), reverse=descending)
    start = _offset(params["NextToken"]) if params.get("NextToken") else 0
    size = params.get("MaxResults") or DEFAULT_MAX_RESULTS
    end = start + size
    return ordered[start:end], _token(end) if end < len(ordered) else None


@dataclasses.dataclass(frozen=True)
class Listing:
    """One List call: the ``member`` its answer's summaries go under; the record fields its NameContains and its
    SortBy Name take (``name``), and its StatusEquals and SortBy Status, if it has them (``status``); what a summary
    holds: those of ``keys`` the record has, or what ``summary`` makes of the record; its other sorts (``sort_by``:
    SortBy → record field) and its defaults."""

    member: str
    name: str
    status: str | None = None
    keys: Sequence[str] = ()
    summary: Callable[[dict], dict] | None = None
    sort_by: Mapping[str, str] = dataclasses.field(default_factory=dict)
    default_sort: str = "CreationTime"
    default_order: str = "Ascending"

    def answer(self, records: list[dict], params: dict) -> dict:
        """The answer to a List call over ``records``: those ``filtered`` keeps, one page of them as ``page`` sorts
        them, each made a summary, with the NextToken when more follow."""
        sorts = {"Name": self.name, "CreationTime": "CreationTime", **self.sort_by}
        if self.status:
            sorts["Status"] = self.status
        kept = filtered(records, params, self.name, self.status)
        shown, token = page(kept, params, sorts, self.default_sort, self.default_order)
        rows = [self.summary(r) if self.summary else cut(r, self.keys) for r in shown]
        return {self.member: rows} | ({"NextToken": token} if token else {})


def cut(record: dict, keys: Sequence[str]) -> dict:
    """The members of ``record`` a summary has, of ``keys``, in their order."""
    return {key: record[key] for key in keys if key in record}
