"""A stage's store on disk: append-only part files, a manifest appended once per part, a current view.

Layout of a stage folder::

    stage.json                      {"stage": name}: marks the folder as a store
    view.keys                       the current view: the keys of the latest plan, one per line, sorted
    view.json                       its digest, and the digests of the upstream views it was planned from
    parts/part-<job>-<n>.jsonl      done records, one JSON object per line, ``key`` first
    rejected/part-<job>-<n>.jsonl   permanent rejections: key, reason, message
    errors/part-<job>-<n>.jsonl     transient failures: key, reason, message, attempts (retried next run)
    manifests/<job>.jsonl           one line per part written by job range <job>: kind, part, records,
                                    sha256, keys, content hashes
    reports/<job>.json              counts of that job range's last run

Every part is written to a temporary name, fsynced and renamed; then its manifest line is appended
(fsynced). A crash between the two leaves a complete part that no manifest lists: the next run of
that range finds it once (one listing of the folder per run, not per part) and lists it. Readers
never list folders: the manifests say which keys exist and where, so a rerun with nothing to do
reads only the manifests and the view, never the records.

Records of older plans stay on disk as a cache (switching an input back reuses them); every reader
goes through the view, so they never leak into the next stage, completeness, export or the card.
:func:`cultureclip.curate.runner.gc.gc` removes what no view reaches.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

from cultureclip import schema
from cultureclip.curate.runner.keys import KEY_CHARS, canonical_json
from cultureclip.rundir import raise_if_disk_full

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
STAGE_FILE, VIEW_FILE, VIEW_META = "stage.json", "view.keys", "view.json"
PARTS, REJECTED, ERRORS, MANIFESTS, REPORTS = "parts", "rejected", "errors", "manifests", "reports"
KINDS = (PARTS, REJECTED, ERRORS)
_KEY_AT = len('{"key":"')  # records are written key first, so a reader can skip a line without parsing it


def line_key(line: Union[str, bytes]) -> str:
    """The key of a part-file line (str or bytes), read from its position without parsing the line."""
    key = line[_KEY_AT:_KEY_AT + KEY_CHARS]
    return key.decode() if isinstance(key, bytes) else key


def write_atomic(path: PathLike, data: Union[bytes, str]) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync and rename: all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        raise_if_disk_full(exc, str(path), "the partial file was removed")  # the bare errno names no file
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


def record_line(key: str, record: dict) -> str:
    """One part-file line: ``{"key": ..., <record, keys sorted>}``; the key first (see ``_KEY_AT``)."""
    body = canonical_json({k: v for k, v in record.items() if k != schema.REC_KEY})
    return '{"key":' + json.dumps(key) + ("," + body[1:] if body != "{}" else "}")


class Index:
    """Where each key's outcome is, read from the manifests only.

    Attributes:
        done: ``{key: part}`` of done records (the first part listing a key wins).
        rejected: ``{key: part}`` of permanent rejections.
        errors: ``{key: part}`` of the latest transient error of keys neither done nor rejected.
        parts: the part paths (relative to the store), indexed by the ints above.
    """

    def __init__(self) -> None:
        self.done: dict[str, int] = {}
        self.rejected: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.parts: list[str] = []
        self.listed: set[str] = set()

    def add(self, entry: dict) -> None:
        """Add one manifest line."""
        part = f"{entry['kind']}/{entry['part']}"
        if part in self.listed:
            return
        self.listed.add(part)
        self.parts.append(part)
        i = len(self.parts) - 1
        if entry["kind"] == PARTS:
            for k in entry["keys"]:
                self.done.setdefault(k, i)
        elif entry["kind"] == REJECTED:
            for k in entry["keys"]:
                self.rejected.setdefault(k, i)
        else:
            for k in entry["keys"]:
                self.errors[k] = i

    def finished(self, key: str) -> bool:
        """Done or rejected: nothing left to do for this key."""
        return key in self.done or key in self.rejected

    def current_error(self, key: str) -> bool:
        return key in self.errors and not self.finished(key)


class Store:
    """One stage's folder (see the module docstring).

    Args:
        root: the stage folder, e.g. ``out/render``.
        stage: the stage name.
    """

    def __init__(self, root: PathLike, stage: str) -> None:
        self.root, self.stage = Path(root), stage

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r}, {self.stage!r})"

    # ------------------------------------------------------------------ view
    def exists(self) -> bool:
        return (self.root / STAGE_FILE).is_file()

    def ensure(self) -> None:
        """Create the folder's marker file (idempotent)."""
        if not self.exists():
            write_atomic(self.root / STAGE_FILE, json.dumps({"stage": self.stage}))

    def write_view(self, keys: Iterable[str], upstream: Iterable["Store"] = (),
                   fingerprint: Optional[str] = None) -> int:
        """Make ``keys`` the current view, planned from the current views of ``upstream`` under ``fingerprint``
        (see :func:`cultureclip.curate.runner.run.up_to_date`); returns their number."""
        self.ensure()
        data = "".join(k + "\n" for k in sorted(set(keys))).encode("ascii")
        meta = {"jobs": data.count(b"\n"), "digest": hashlib.sha256(data).hexdigest(),
                "upstream": {u.stage: u.view_digest() for u in upstream}, "fingerprint": fingerprint}
        write_atomic(self.root / VIEW_FILE, data)
        write_atomic(self.root / VIEW_META, json.dumps(meta, sort_keys=True))
        return meta["jobs"]

    def view_meta(self) -> dict:
        path = self.root / VIEW_META
        if not path.is_file():
            raise FileNotFoundError(f"{self.root} has no current view: run stage={self.stage} first")
        return json.loads(path.read_text())

    def view_digest(self) -> str:
        """The sha256 of the current view (what downstream views record they were planned from)."""
        return self.view_meta()["digest"]

    def has_view(self) -> bool:
        return (self.root / VIEW_FILE).is_file()

    def view(self) -> list[str]:
        """The current keys, sorted.

        Raises:
            FileNotFoundError: the stage has never planned here (naming the folder and the stage to run).
        """
        path = self.root / VIEW_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{self.root} has no current view: run stage={self.stage} first")
        with open(path, encoding="ascii") as f:
            return [line[:-1] for line in f]

    # ------------------------------------------------------------------ index
    def manifest_entries(self) -> Iterator[dict]:
        """Every manifest line of every job range (a torn last line, from a kill mid-append, is skipped)."""
        folder = self.root / MANIFESTS
        if not folder.is_dir():
            return
        for path in sorted(folder.glob("*.jsonl")):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.endswith("\n"):
                        yield json.loads(line)

    def index(self) -> Index:
        """The :class:`Index` of every key in the store, from the manifests only."""
        index = Index()
        for entry in self.manifest_entries():
            index.add(entry)
        return index

    # ------------------------------------------------------------------ reading
    def _lines(self, part: str) -> Iterator[tuple[str, str]]:
        with open(self.root / part, encoding="utf-8") as f:
            for line in f:
                yield line_key(line), line

    def _read(self, kind_map: dict, keys: Optional[Iterable[str]], index: Index) -> Iterator[dict]:
        wanted = set(kind_map) if keys is None else {k for k in keys if k in kind_map}
        by_part: dict[int, int] = Counter(kind_map[k] for k in wanted)
        for part in sorted(by_part):
            for key, line in self._lines(index.parts[part]):
                if key in wanted and kind_map[key] == part:
                    try:
                        yield json.loads(line)
                    except ValueError as exc:  # parts are written atomically: this is damage, not a crash
                        raise ValueError(f"{self.root / index.parts[part]}: damaged record file: {exc}") from exc

    def records(self, keys: Optional[Iterable[str]] = None, index: Optional[Index] = None) -> Iterator[dict]:
        """Stream the done records of ``keys`` (default: the current view), each once, part by part.

        Only the parts that hold a wanted key are opened; memory holds one record at a time.
        """
        index = index or self.index()
        return self._read(index.done, self.view() if keys is None else keys, index)

    def rejections(self, keys: Optional[Iterable[str]] = None, index: Optional[Index] = None) -> Iterator[dict]:
        """Stream the rejections of ``keys`` (default: the current view)."""
        index = index or self.index()
        return self._read(index.rejected, self.view() if keys is None else keys, index)

    def errors(self, keys: Optional[Iterable[str]] = None, index: Optional[Index] = None) -> Iterator[dict]:
        """Stream the latest error of every key of ``keys`` (default: the view) that is not finished."""
        index = index or self.index()
        keys = self.view() if keys is None else keys
        return self._read(index.errors, [k for k in keys if not index.finished(k)], index)

    def status(self, index: Optional[Index] = None) -> dict:
        """Counts over the current view: done, rejected (by reason), errors (by reason), missing."""
        index = index or self.index()
        view = self.view()
        done = sum(1 for k in view if k in index.done)
        rejected = Counter(r[schema.REASON] for r in self.rejections(view, index))
        errors = Counter(e[schema.REC_ERROR] for e in self.errors(view, index))
        missing = len(view) - done - sum(rejected.values())
        return {"jobs": len(view), "done": done, "rejected": sum(rejected.values()),
                "rejected_by_reason": dict(sorted(rejected.items())), "errors": sum(errors.values()),
                "errors_by_reason": dict(sorted(errors.items())), "missing": missing,
                "not_run": missing - sum(errors.values())}

    def require_complete(self, consumer: str, upstream: Iterable["Store"] = ()) -> None:
        """Refuse to read a view that has jobs neither done nor rejected, or that was planned from other
        views of ``upstream`` than their current ones (an upstream stage ran again since).

        Raises:
            FileNotFoundError: the stage never ran here. ValueError: naming the count of missing current jobs.
        """
        if not self.exists() or not self.has_view():
            raise FileNotFoundError(f"{self.root} not found: run stage={self.stage} before stage={consumer}")
        for up in upstream:
            planned = self.view_meta()["upstream"].get(up.stage)
            if planned != up.view_digest():
                raise ValueError(f"{self.root}: the current {self.stage} jobs were planned from another {up.stage} "
                                 f"view than the current one in {up.root} (it changed since); run stage={self.stage} "
                                 f"again before stage={consumer}")
        s = self.status()
        if s["missing"]:
            raise ValueError(
                f"{self.root}: {s['missing']} of {s['jobs']} current {self.stage} jobs are neither done nor rejected "
                f"({s['errors']} failed {s['errors_by_reason'] or ''}, {s['not_run']} not run yet: another job "
                f"range, or a stopped run); run stage={self.stage} again (every shard_index) before stage={consumer}")

    def reports(self) -> list[dict]:
        """The last report of every job range."""
        folder = self.root / REPORTS
        paths = sorted(p for p in folder.glob("*.json") if not p.name.startswith(".")) if folder.is_dir() else []
        return [json.loads(p.read_text()) for p in paths]

    def verify(self) -> None:
        """Check every listed part against its manifest line (record count and sha256)."""
        for entry in self.manifest_entries():
            path = self.root / entry["kind"] / entry["part"]
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != entry["sha256"] or data.count(b"\n") != entry["records"]:
                raise ValueError(f"{path} does not match its manifest (changed or truncated since written)")
