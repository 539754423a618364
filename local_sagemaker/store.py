"""The service's records on disk: one JSON file per resource, written atomically, read back at start.

`<state_dir>/<kind>/<name>.json` for each kind (training-jobs, models, endpoint-configs, endpoints, experiments,
trials, trial-components). Every change goes through `Store.put`, which writes a temporary file, fsyncs it,
renames it over the record and fsyncs the directory, so a crash leaves the old record or the new one, never half of
one. Records are held
in memory too (the service is their only writer), behind one lock: handlers run in threads.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import logging
import os
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

KINDS = (
    "training-jobs",
    "models",
    "endpoint-configs",
    "endpoints",
    "experiments",
    "trials",
    "trial-components",
    "model-package-groups",
    "model-packages",
    "transform-jobs",
    "hyper-parameter-tuning-jobs",
    "async-invocations",
)


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` in one step: a reader (or a crash) sees the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make the renames in ``directory`` durable: until the directory itself is synced, a power cut may leave it
    naming the old file, or none, whatever was synced of the file."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _encode(value):
    if isinstance(value, datetime.datetime):
        return {"$datetime": value.isoformat()}
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _decode(value: dict):
    if value.keys() == {"$datetime"}:
        return datetime.datetime.fromisoformat(value["$datetime"])
    return value


# What a file that cannot be read is renamed to: `<name>.unreadable-<UTC time>`, beside where it was.
UNREADABLE = ".unreadable-"


def set_aside(path: Path, why: str) -> Path:
    """Rename ``path``, which cannot be read, out of the way (never delete it: it may be all that is left of what it
    recorded), and log both names."""
    aside = path.with_name(f"{path.name}{UNREADABLE}{now().strftime('%Y%m%dT%H%M%S.%fZ')}")
    os.replace(path, aside)
    log.error("%s cannot be read (%s): set aside as %s", path, why, aside.name)
    return aside


def set_aside_files(root: Path) -> list[Path]:
    """Every file set aside under ``root``."""
    return sorted(root.rglob(f"*{UNREADABLE}*"))


class Store:
    """Records by kind and name. ``get`` and ``items`` return copies: a handler's edits count only once put."""

    def __init__(self, state_dir: Path):
        self.root = Path(state_dir)
        self.lock = threading.RLock()
        self._records: dict[str, dict[str, dict]] = {kind: {} for kind in KINDS}
        for kind in KINDS:
            directory = self.root / kind
            directory.mkdir(parents=True, exist_ok=True)
            for path in sorted(directory.glob("*.json")):
                # A record torn by a power cut, or damaged by hand, must not keep the service (and every other
                # record's endpoint) from starting: it is set aside, named in the log and by `mnist-pipeline status`.
                try:
                    record = json.loads(path.read_bytes(), object_hook=_decode)
                except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, a bad $datetime
                    set_aside(path, str(error))
                    continue
                if not isinstance(record, dict):
                    set_aside(path, f"a JSON {type(record).__name__}, not an object")
                    continue
                self._records[kind][path.stem] = record

    def _path(self, kind: str, name: str) -> Path:
        # Names reach here only after the API's own name pattern ([a-zA-Z0-9-]); refuse anything else outright.
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"unsafe record name {name!r}")
        return self.root / kind / f"{name}.json"

    def get(self, kind: str, name: str) -> dict | None:
        with self.lock:
            record = self._records[kind].get(name)
            return copy.deepcopy(record) if record is not None else None

    def require(self, kind: str, name: str, missing: Exception) -> dict:
        """The record, as ``get`` gives it; ``missing``, the API's own error for an unknown name, when there is none."""
        if (record := self.get(kind, name)) is None:
            raise missing
        return record

    def put_new(self, kind: str, name: str, record: dict, taken: Exception) -> dict:
        """``put`` for a create: ``taken``, the API's own error for a name in use, when a record of ``kind`` has
        ``name`` already. The check and the write hold ``lock`` together, so two creates of one name cannot both pass."""
        with self.lock:
            if self.get(kind, name) is not None:
                raise taken
            return self.put(kind, name, record)

    def put(self, kind: str, name: str, record: dict) -> dict:
        with self.lock:
            write_atomically(self._path(kind, name), json.dumps(record, default=_encode, indent=1).encode())
            self._records[kind][name] = copy.deepcopy(record)
            return record

    def update(self, kind: str, name: str, **fields) -> dict:
        """Set ``fields`` on a record (None deletes the key); returns the record as stored."""
        with self.lock:
            record = self._records[kind][name]
            changed = {**record, **fields}
            for key, value in fields.items():
                if value is None:
                    changed.pop(key, None)
            return self.put(kind, name, changed)

    def delete(self, kind: str, name: str) -> None:
        with self.lock:
            self._records[kind].pop(name, None)
            self._path(kind, name).unlink(missing_ok=True)

    def items(self, kind: str) -> list[dict]:
        with self.lock:
            return [copy.deepcopy(record) for record in self._records[kind].values()]

    def names(self, kind: str) -> list[str]:
        with self.lock:
            return list(self._records[kind])
