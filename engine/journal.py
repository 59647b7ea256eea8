"""The resume journal of a batch job (:class:`TileJournal`).

An append-only JSON-lines file beside the output (``OUT.geojson.journal``): a header line
identifying the job, then one line per finished tile, flushed and fsynced as each completes.
Resuming with a different header is refused (:class:`engine.errors.JobError`); a torn last
line (a run killed mid-write) is dropped. The final GeoJSON must be built from the journal's
records (``journal.records()``), so a resumed run writes exactly what an uninterrupted run
writes: per-tile timing is fine inside ``extra`` because it is journalled with the tile.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

from engine.errors import JobError
from engine.outputs import TileRecord

log = logging.getLogger(__name__)

JOURNAL_VERSION = 1


def journal_path(output: str | os.PathLike[str]) -> Path:
    """``OUT.geojson`` -> ``OUT.geojson.journal``."""
    return Path(str(output) + ".journal")


def _normalise(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, allow_nan=False))


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


class TileJournal:
    """Append-only JSON-lines record of finished tiles, for resuming a batch job.

    Parameters
    ----------
    path
        The journal file (see :func:`journal_path`).
    job
        JSON-able identity of the job: raster (e.g. :func:`engine.inputs.raster_identity`), size, bands,
        tiling (:meth:`engine.tiling.TilingParams.to_dict`), model id... A resume must present the same.

    Use :meth:`open` to start or resume, :meth:`append` per finished tile, :meth:`records` for
    the finished tiles by index, :meth:`close` at the end (or a ``with`` block).
    """

    def __init__(self, path: str | os.PathLike[str], job: Mapping[str, Any]) -> None:
        self.path = Path(path)
        try:
            self.job = _normalise(dict(job))
        except (TypeError, ValueError) as exc:
            raise JobError(f"the job description cannot be journalled: {exc}") from None
        self._records: dict[int, TileRecord] = {}
        self._fh: Any = None

    @classmethod
    def for_output(cls, output: str | os.PathLike[str], job: Mapping[str, Any]) -> TileJournal:
        return cls(journal_path(output), job)

    # -- reading -----------------------------------------------------------------------------
    def load(self) -> tuple[dict[str, Any] | None, dict[int, TileRecord], int]:
        """Read the journal: (job header or None, records by tile index, byte length of the good part).

        A torn last line (no newline, or not JSON) is ignored; a broken line before it is an error.
        """
        try:
            blob = self.path.read_bytes()
        except FileNotFoundError:
            return None, {}, 0
        except OSError as exc:
            raise JobError(f"cannot read journal '{self.path}': {exc.strerror or exc}") from None
        header: dict[str, Any] | None = None
        records: dict[int, TileRecord] = {}
        good = 0
        pos = 0
        lines = blob.split(b"\n")
        for number, line in enumerate(lines, start=1):
            last = number == len(lines)
            end = pos + len(line) + (0 if last else 1)
            if not line.strip():
                pos = end
                if not last:
                    good = end
                continue
            try:
                if last:
                    raise ValueError("no newline: torn write")
                obj = json.loads(line)
                if header is None:
                    if not (isinstance(obj, dict) and obj.get("rsmoe_journal") == JOURNAL_VERSION and "job" in obj):
                        raise JobError(f"'{self.path}' is not an RS-MoE tile journal (version {JOURNAL_VERSION})")
                    header = obj["job"]
                else:
                    rec = TileRecord.from_json(obj)
                    records[rec.tile_index] = rec
            except JobError:
                raise
            except Exception as exc:
                if last or all(not rest.strip() for rest in lines[number:]):
                    log.warning("journal '%s': ignoring a torn last line (%d bytes): %s", self.path, len(line), exc)
                    break
                raise JobError(
                    f"journal '{self.path}' is corrupt at line {number}; delete it to start the job afresh"
                ) from None
            pos = end
            good = end
        return header, records, good

    def records(self) -> dict[int, TileRecord]:
        """Finished tiles by tile index, in index order."""
        return {i: self._records[i] for i in sorted(self._records)}

    # -- writing -----------------------------------------------------------------------------
    def open(self, resume: bool = True) -> dict[int, TileRecord]:
        """Start the journal, or resume it; returns the tiles already finished.

        With ``resume`` and an existing journal of the same job, its records are kept (a torn
        last line is cut off). A journal of a different job raises :class:`JobError`.
        Without ``resume`` an existing journal is replaced by a fresh one.
        """
        header, records, good = self.load() if resume else (None, {}, 0)
        if header is not None:
            if _normalise(header) != self.job:
                diff = "; ".join(_differences(_normalise(header), self.job)[:5])
                raise JobError(
                    f"journal '{self.path}' belongs to a different job ({diff}); resume with the same "
                    f"parameters, or delete the journal / start without resume"
                )
            self._records = records
            try:
                self._fh = open(self.path, "r+b")
                self._fh.truncate(good)
                self._fh.seek(good)
            except OSError as exc:
                raise JobError(f"cannot append to journal '{self.path}': {exc.strerror or exc}") from None
            log.info("resuming from journal %s: %d tile(s) done", self.path, len(records))
        else:
            self._records = {}
            try:
                self._fh = open(self.path, "wb")
            except OSError as exc:
                raise JobError(f"cannot create journal '{self.path}': {exc.strerror or exc}") from None
            self._write_line({"rsmoe_journal": JOURNAL_VERSION, "job": self.job})
        return self.records()

    def _write_line(self, obj: Mapping[str, Any]) -> None:
        line = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n"
        try:
            self._fh.write(line.encode("utf-8"))
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as exc:
            raise JobError(f"cannot write journal '{self.path}': {exc.strerror or exc}") from None

    def append(self, record: TileRecord) -> None:
        """Record a finished tile durably (written, flushed and fsynced before returning)."""
        if self._fh is None:
            raise JobError(f"journal '{self.path}' is not open")
        try:
            obj = record.to_json()
            json.dumps(obj, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise JobError(f"tile {record.tile_index}: its record cannot be journalled ({exc})") from None
        self._write_line(obj)
        self._records[record.tile_index] = TileRecord.from_json(_normalise(obj))

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def remove(self) -> None:
        """Close and delete the journal (after the final output is written, if wanted)."""
        self.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> TileJournal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
