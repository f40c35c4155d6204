"""The score store: everything ``madseg score`` computes about a pool, in one directory.

Layout::

    <store>/store.json                  format, working resolution (H, W), C, class names
    <store>/shards/shard-00000.sqlite   SQLite databases, one per writing process (torchrun rank)
    <store>/pool_report.tsv             bad / converted / duplicate / unreadable files of the last run

Why SQLite (not Parquet): scoring appends a few rows per image and must survive ``kill -9`` at any
moment; SQLite in WAL mode gives atomic, durable transactions (each scored batch is one
transaction, so a killed run never leaves half a batch), primary keys make re-runs idempotent
(``INSERT OR IGNORE``), and indexed point look-ups answer "is this image already done?" without
loading anything into memory. Parquet is write-once per file and would need its own
journal/compaction for all three. The selection reads a few columns of every row once, which
SQLite streams fast enough (about a second per million rows and model).

Scale-out: every process writes only its own shard file, so writers never contend; all rows are
keyed by content (image id, model version), so shards merge without conflicts —
:func:`merge_shards` copies every other shard into the lowest one with ``INSERT OR IGNORE`` in
one transaction, then deletes them (a crash in between leaves duplicates that every read ignores).
Reads always go over all shards present, de-duplicating by primary key.

Tables (per shard):

- ``files(path PK, size, mtime_ns, image_id, error, seen_run, scanned_at)``: every pool entry
  (local path or URL) with the content id of its bytes, or the reason it could not be read.
  A path whose size and mtime are unchanged is not hashed again.
- ``images(image_id PK, height, width, mode)``: decoded images (original size, PIL mode before
  conversion to RGB); ``bad(image_id PK, reason)``: contents that are not readable images.
- ``models(version PK, name, spec, num_classes, class_names, input_h, input_w)``.
- ``areas(model_version, image_id, areas BLOB = C float32, entropy)``: per model version and
  image, the fraction of pixels predicted as each class and the mean per-pixel softmax entropy
  (nats; stored when the model ran as the target, else NULL), both at the working resolution;
  ``maps(image_id, model_version, png)``: the predicted label map at the working resolution as a
  palette PNG.
- ``distances(target_version, competitor_version, image_id, miou, pixel_accuracy)``: the
  distance between the two label maps (both metrics, so ``madseg select --metric`` is free).
- ``runs(run_id PK, started, target_version, competitor_versions, sources, resolution)``.

Public functions (all take the store directory):

- ``read_label_map(store_dir, model_version, image_id, size=None) -> (h, w) uint8`` at the
  working resolution, or resized (nearest) to ``size`` = (H, W), e.g. the original image size;
- ``read_areas(store_dir, model_version) -> (ids (N,) str, areas (N, C) float32, entropy (N,))``
  sorted by image id;
- ``read_distances(store_dir, target_version, competitor_version, metric) -> (ids, d (N,))``;
- ``iter_images(store_dir) -> Iterator[ImageInfo]`` (id, path, height, width, mode), by id;
- ``image_paths(store_dir, ids) -> list[str | None]``; ``list_models``, ``list_runs``;
- ``merge_shards(store_dir) -> Path``.

:class:`ScoreStore` is the object behind them (used by the scorer).
"""

from __future__ import annotations

import contextlib
import heapq
import io
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ml_backend.atomic import atomic_write_json
from ml_backend.classes import voc_palette
from ml_backend.errors import MadsegError
from ml_backend.labelmaps import resize_labels

FORMAT_VERSION = 1
META_NAME = "store.json"
SHARD_DIR = "shards"
REPORT_NAME = "pool_report.tsv"
#: Rows per page when streaming a table.
PAGE_SIZE = 2000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files(
    path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, image_id TEXT, error TEXT,
    seen_run TEXT, scanned_at REAL);
CREATE INDEX IF NOT EXISTS files_image ON files(image_id);
CREATE INDEX IF NOT EXISTS files_run ON files(seen_run, image_id, path);
CREATE INDEX IF NOT EXISTS files_run_path ON files(seen_run, path);
CREATE TABLE IF NOT EXISTS images(
    image_id TEXT PRIMARY KEY, height INTEGER, width INTEGER, mode TEXT) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS bad(image_id TEXT PRIMARY KEY, reason TEXT) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS models(
    version TEXT PRIMARY KEY, name TEXT, spec TEXT, num_classes INTEGER, class_names TEXT,
    input_h INTEGER, input_w INTEGER);
CREATE TABLE IF NOT EXISTS areas(
    model_version TEXT, image_id TEXT, areas BLOB, entropy REAL,
    PRIMARY KEY(model_version, image_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS maps(
    image_id TEXT, model_version TEXT, png BLOB, PRIMARY KEY(image_id, model_version));
CREATE TABLE IF NOT EXISTS distances(
    target_version TEXT, competitor_version TEXT, image_id TEXT, miou REAL, pixel_accuracy REAL,
    PRIMARY KEY(target_version, competitor_version, image_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS runs(
    run_id TEXT PRIMARY KEY, started REAL, target_version TEXT, competitor_versions TEXT,
    sources TEXT, resolution TEXT);
"""
_TABLES = ("files", "images", "bad", "models", "areas", "maps", "distances", "runs")
_PALETTE = voc_palette(256).reshape(-1).tolist()


def shard_name(rank: int) -> str:
    """File name of the shard written by process ``rank``."""
    return f"shard-{rank:05d}.sqlite"


def id_bucket(image_id: str) -> int:
    """A uniform integer from an image id (to split ids across ranks: ``bucket % world``)."""
    return int(image_id[:8], 16)


def encode_label_png(label_map: np.ndarray) -> bytes:
    """(H, W) uint8 label map -> palette PNG bytes (zlib level 1: fast, label maps compress well)."""
    im = Image.fromarray(np.ascontiguousarray(label_map, dtype=np.uint8), mode="P")
    im.putpalette(_PALETTE)
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_label_png(data: bytes) -> np.ndarray:
    """Palette PNG bytes -> (H, W) uint8 label map (the palette indices)."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im, dtype=np.uint8).copy()


@dataclass(frozen=True)
class StoreMeta:
    """Store-wide settings (``store.json``)."""

    resolution: tuple[int, int]
    num_classes: int
    class_names: tuple[str, ...]


@dataclass(frozen=True)
class ImageInfo:
    """One scored image: content id, a path (smallest path with this content), original size."""

    image_id: str
    path: str | None
    height: int
    width: int
    mode: str


@dataclass(frozen=True)
class FileRow:
    """What the store knows about a pool entry."""

    path: str
    size: int | None
    mtime_ns: int | None
    image_id: str | None
    error: str | None
    seen_run: str | None


def _create_with_schema(path: Path) -> None:
    """Create the database file ``path`` with its schema, atomically: the schema is written to a
    hidden temporary file that is then linked into place. Readers list shards while other ranks
    create theirs; they must never open a shard that exists but has no tables yet ("no such table")."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    conn = sqlite3.connect(str(tmp), isolation_level=None)
    try:
        conn.executescript(_SCHEMA)
    finally:
        conn.close()
    try:
        os.link(tmp, path)  # never replaces a shard that appeared meanwhile
    except FileExistsError:
        pass
    except OSError:  # a file system without hard links: this rank is the shard's only writer
        if not path.exists():
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _connect(path: Path, *, wal: bool, readonly: bool) -> sqlite3.Connection:
    if not readonly and not path.exists():
        _create_with_schema(path)
    conn = sqlite3.connect(str(path), timeout=120.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=120000")
    if readonly:
        conn.execute("PRAGMA query_only=1")
    else:
        conn.execute(f"PRAGMA journal_mode={'WAL' if wal else 'DELETE'}")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
    return conn


class ScoreStore:
    """A score store directory; writes go to this process's shard, reads cover all shards.

    ``writer_rank=None`` opens the store read-only. ``wal=False`` uses a rollback journal (for
    stores on network file systems shared by several machines, where WAL is not supported).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        writer_rank: int | None = 0,
        wal: bool = True,
        check: bool = True,
    ):
        self.root = Path(root)
        self.wal = wal
        self.writer_rank = writer_rank
        self._writer: sqlite3.Connection | None = None
        self._readers: dict[Path, sqlite3.Connection] = {}
        if writer_rank is None:
            if check and not (self.root / META_NAME).is_file() and not self.shard_paths():
                raise MadsegError(
                    f"{self.root} is not a score store (no {META_NAME}); "
                    f"run `madseg score --store {self.root}` first"
                )
        else:
            (self.root / SHARD_DIR).mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- connections
    @property
    def writer_path(self) -> Path:
        if self.writer_rank is None:
            raise MadsegError(f"{self.root}: store opened read-only")
        return self.root / SHARD_DIR / shard_name(self.writer_rank)

    @property
    def writer(self) -> sqlite3.Connection:
        """The connection to this process's own shard (created on first use)."""
        if self._writer is None:
            self._writer = _connect(self.writer_path, wal=self.wal, readonly=False)
        return self._writer

    def shard_paths(self) -> list[Path]:
        """All shard files, sorted."""
        d = self.root / SHARD_DIR
        return sorted(d.glob("shard-*.sqlite")) if d.is_dir() else []

    def readers(self) -> list[sqlite3.Connection]:
        """One connection per shard (this process's writer for its own shard), in shard order."""
        out = []
        for p in self.shard_paths():
            if self.writer_rank is not None and p == self.writer_path:
                out.append(self.writer)
                continue
            conn = self._readers.get(p)
            if conn is None:
                conn = _connect(p, wal=self.wal, readonly=True)
                self._readers[p] = conn
            out.append(conn)
        return out

    def close(self) -> None:
        for conn in self._readers.values():
            conn.close()
        self._readers.clear()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> ScoreStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic, durable write transaction on this process's shard."""
        conn = self.writer
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # ---------------------------------------------------------------- meta
    def read_meta(self) -> StoreMeta | None:
        p = self.root / META_NAME
        if not p.is_file():
            return None
        try:
            data = json.loads(p.read_text())
            return StoreMeta(tuple(data["resolution"]), int(data["num_classes"]), tuple(data["class_names"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise MadsegError(
                f"{p}: not a valid score store description ({exc}); use a new --store"
            ) from None

    def ensure_meta(
        self, resolution: tuple[int, int] | None, num_classes: int, class_names: Sequence[str],
        default_resolution: tuple[int, int],
    ) -> StoreMeta:
        """Create ``store.json`` or check that the requested settings match the existing one."""
        meta = self.read_meta()
        if meta is None:
            res = tuple(int(v) for v in (resolution or default_resolution))
            meta = StoreMeta((res[0], res[1]), int(num_classes), tuple(class_names))
            atomic_write_json(self.root / META_NAME, {
                "format": FORMAT_VERSION, "resolution": list(meta.resolution),
                "num_classes": meta.num_classes, "class_names": list(meta.class_names),
                "created": time.time(),
            })
            return meta
        if resolution is not None and tuple(resolution) != meta.resolution:
            raise MadsegError(
                f"{self.root} stores label maps at {meta.resolution[0]}x{meta.resolution[1]}, not "
                f"{resolution[0]}x{resolution[1]}; drop --resolution or use a new --store"
            )
        if num_classes != meta.num_classes:
            raise MadsegError(
                f"{self.root} holds {meta.num_classes}-class predictions; the models have {num_classes} "
                "classes; use a new --store"
            )
        return meta

    # ---------------------------------------------------------------- point look-ups (all shards)
    def lookup_file(self, path: str) -> FileRow | None:
        """The most recently scanned row for ``path`` over all shards, or None."""
        best = None
        for conn in self.readers():
            row = conn.execute(
                "SELECT path, size, mtime_ns, image_id, error, seen_run, scanned_at FROM files WHERE path=?",
                (path,),
            ).fetchone()
            if row is not None and (best is None or (row[6] or 0) > (best[6] or 0)):
                best = row
        return FileRow(*best[:6]) if best else None

    def done_models(self, image_id: str) -> set[str]:
        """Model versions with a stored label map (and areas) for ``image_id``."""
        out: set[str] = set()
        for conn in self.readers():
            rows = conn.execute("SELECT model_version FROM maps WHERE image_id=?", (image_id,))
            out.update(r[0] for r in rows)
        return out

    def has_entropy(self, model_version: str, image_id: str) -> bool:
        """Whether the model's mean entropy is stored for the image (it is for target runs)."""
        for conn in self.readers():
            row = conn.execute(
                "SELECT entropy FROM areas WHERE model_version=? AND image_id=?", (model_version, image_id)
            ).fetchone()
            if row and row[0] is not None:
                return True
        return False

    def has_distance(self, target_version: str, competitor_version: str, image_id: str) -> bool:
        for conn in self.readers():
            if conn.execute(
                "SELECT 1 FROM distances WHERE target_version=? AND competitor_version=? AND image_id=?",
                (target_version, competitor_version, image_id),
            ).fetchone():
                return True
        return False

    def bad_reason(self, image_id: str) -> str | None:
        for conn in self.readers():
            row = conn.execute("SELECT reason FROM bad WHERE image_id=?", (image_id,)).fetchone()
            if row:
                return row[0]
        return None

    def label_png(self, model_version: str, image_id: str) -> bytes | None:
        for conn in self.readers():
            row = conn.execute(
                "SELECT png FROM maps WHERE image_id=? AND model_version=?", (image_id, model_version)
            ).fetchone()
            if row:
                return row[0]
        return None

    def read_label_map(
        self, model_version: str, image_id: str, size: tuple[int, int] | None = None
    ) -> np.ndarray:
        """(h, w) uint8 label map at the working resolution, or resized (nearest) to ``size`` =
        (H, W), e.g. the image's original size; MadsegError if not stored."""
        data = self.label_png(model_version, image_id)
        if data is None:
            raise MadsegError(
                f"{self.root}: no label map of model {model_version} for image {image_id}; "
                "score the pool with that model first"
            )
        lab = decode_label_png(data)
        if size is not None and tuple(size) != lab.shape:
            lab = resize_labels(lab, (int(size[0]), int(size[1]))).copy()
        return lab

    def image_path(self, image_id: str) -> str | None:
        """The smallest readable path (or URL) with this content, over all shards."""
        best = None
        for conn in self.readers():
            row = conn.execute(
                "SELECT MIN(path) FROM files WHERE image_id=? AND error IS NULL", (image_id,)
            ).fetchone()
            if row and row[0] is not None and (best is None or row[0] < best):
                best = row[0]
        return best

    # ---------------------------------------------------------------- streams (all shards, by id)
    # Streams read in pages (keyset pagination), so no read transaction stays open for long:
    # a long-lived reader would stop SQLite from check-pointing the WAL of a shard being written.
    def _merged_pages(self, sql: str, params: Sequence[Any], start: tuple, key_len: int) -> Iterator[tuple]:
        """Rows of ``sql`` merged over shards in key order. ``sql`` must contain ``{after}`` (a
        row-value condition on the key columns, which come first) and end with ORDER BY the key
        and ``LIMIT ?``."""
        after_sql = "(" + ", ".join("?" for _ in range(key_len)) + ")"

        def pages(conn: sqlite3.Connection) -> Iterator[tuple]:
            after = start
            while True:
                rows = conn.execute(sql.format(after=after_sql), (*params, *after, PAGE_SIZE)).fetchall()
                yield from rows
                if len(rows) < PAGE_SIZE:
                    return
                after = tuple(rows[-1][:key_len])

        return heapq.merge(*(pages(conn) for conn in self.readers()))

    def iter_run_ids(self, run_id: str) -> Iterator[tuple[str, str]]:
        """``(image_id, path)`` of every readable entry seen in ``run_id``, one per image id
        (the smallest path), sorted by id."""
        last = None
        for image_id, path in self._merged_pages(
            "SELECT image_id, MIN(path) FROM files WHERE seen_run=? AND image_id IS NOT NULL "
            "AND error IS NULL AND (image_id) > {after} GROUP BY image_id ORDER BY image_id LIMIT ?",
            (run_id,), ("",), 1,
        ):
            if image_id != last:
                last = image_id
                yield image_id, path

    def iter_run_paths(self, run_id: str) -> Iterator[tuple[str, str]]:
        """``(image_id, path)`` of every readable entry seen in ``run_id``, sorted by (id, path),
        each pair once."""
        last = None
        for row in self._merged_pages(
            "SELECT image_id, path FROM files WHERE seen_run=? AND image_id IS NOT NULL AND error IS NULL "
            "AND (image_id, path) > {after} ORDER BY image_id, path LIMIT ?",
            (run_id,), ("", ""), 2,
        ):
            if row != last:
                last = row
                yield row

    def iter_run_errors(self, run_id: str) -> Iterator[tuple[str, str]]:
        """``(path, error)`` of every entry of ``run_id`` that could not be read, by path."""
        last = None
        for row in self._merged_pages(
            "SELECT path, error FROM files WHERE seen_run=? AND error IS NOT NULL "
            "AND (path) > {after} ORDER BY path LIMIT ?",
            (run_id,), ("",), 1,
        ):
            if row[0] != last:
                last = row[0]
                yield row

    def count_run_entries(self, run_id: str) -> int:
        """Distinct paths seen in ``run_id`` (over all shards)."""
        n, last = 0, None
        for (path,) in self._merged_pages(
            "SELECT path FROM files WHERE seen_run=? AND (path) > {after} ORDER BY path LIMIT ?",
            (run_id,), ("",), 1,
        ):
            if path != last:
                n, last = n + 1, path
        return n

    def image_mode(self, image_id: str) -> str | None:
        for conn in self.readers():
            row = conn.execute("SELECT mode FROM images WHERE image_id=?", (image_id,)).fetchone()
            if row:
                return row[0]
        return None

    def iter_images(self) -> Iterator[ImageInfo]:
        """Every decoded image (not bad), sorted by id, with its smallest readable path."""
        last = None
        for image_id, h, w, mode in self._merged_pages(
            "SELECT image_id, height, width, mode FROM images WHERE (image_id) > {after} "
            "ORDER BY image_id LIMIT ?", (), ("",), 1,
        ):
            if image_id == last:
                continue
            last = image_id
            yield ImageInfo(image_id, self.image_path(image_id), int(h), int(w), mode)

    # ---------------------------------------------------------------- bulk reads for selection
    def read_areas(self, model_version: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ids (N,) str, areas (N, C) float32, entropy (N,) float64)`` of one model, by id
        (entropy NaN where the model never ran as the target)."""
        ids_l, blobs_l, ent_l = [], [], []
        for conn in self.readers():
            rows = conn.execute(
                "SELECT image_id, areas, entropy FROM areas WHERE model_version=? ORDER BY image_id",
                (model_version,),
            ).fetchall()
            if rows:
                ids, blobs, ent = zip(*rows, strict=True)
                ids_l.append(np.array(ids, dtype="S32"))
                blobs_l.append(np.frombuffer(b"".join(blobs), dtype=np.float32))
                ent_l.append(np.array(ent, dtype=np.float64))
        if not ids_l:
            return np.array([], dtype=str), np.zeros((0, 0), np.float32), np.zeros(0)
        ids = np.concatenate(ids_l)
        areas = np.concatenate(blobs_l).reshape(ids.size, -1)
        ent = np.concatenate(ent_l)
        uniq, first = np.unique(ids, return_index=True)
        return uniq.astype(str), areas[first], ent[first]

    def read_distances(
        self, target_version: str, competitor_version: str, metric: str = "miou"
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(ids (N,) str, distances (N,) float64)`` for one (target, competitor) pair, by id."""
        if metric not in ("miou", "pixel_accuracy"):
            raise MadsegError(f"unknown metric {metric!r}; use miou or pixel_accuracy")
        ids_l, d_l = [], []
        for conn in self.readers():
            rows = conn.execute(
                f"SELECT image_id, {metric} FROM distances WHERE target_version=? AND "
                "competitor_version=? ORDER BY image_id", (target_version, competitor_version),
            ).fetchall()
            if rows:
                ids, d = zip(*rows, strict=True)
                ids_l.append(np.array(ids, dtype="S32"))
                d_l.append(np.array(d, dtype=np.float64))
        if not ids_l:
            return np.array([], dtype=str), np.zeros(0)
        ids = np.concatenate(ids_l)
        d = np.concatenate(d_l)
        uniq, first = np.unique(ids, return_index=True)
        return uniq.astype(str), d[first]

    def list_models(self) -> list[dict[str, Any]]:
        seen: dict[str, dict[str, Any]] = {}
        for conn in self.readers():
            for v, name, spec, c, names, h, w in conn.execute(
                "SELECT version, name, spec, num_classes, class_names, input_h, input_w FROM models"
            ):
                seen.setdefault(v, {
                    "version": v, "name": name, "spec": json.loads(spec) if spec else None,
                    "num_classes": c, "class_names": json.loads(names), "input_size": (h, w),
                })
        return sorted(seen.values(), key=lambda d: d["version"])

    def list_runs(self) -> list[dict[str, Any]]:
        """Score runs, oldest first."""
        seen: dict[str, dict[str, Any]] = {}
        for conn in self.readers():
            for rid, started, tv, cvs, sources, res in conn.execute(
                "SELECT run_id, started, target_version, competitor_versions, sources, resolution FROM runs"
            ):
                seen.setdefault(rid, {
                    "run_id": rid, "started": started, "target_version": tv,
                    "competitor_versions": json.loads(cvs), "sources": json.loads(sources),
                    "resolution": res,
                })
        return sorted(seen.values(), key=lambda d: (d["started"], d["run_id"]))

    # ---------------------------------------------------------------- writes (own shard)
    def put_model(self, conn: sqlite3.Connection, model: Any) -> None:
        spec = getattr(model, "spec", None)
        spec_json = None
        if spec is not None:
            spec_json = json.dumps(spec.to_dict() if hasattr(spec, "to_dict") else spec, default=str)
        h, w = model.input_size
        conn.execute(
            "INSERT OR IGNORE INTO models VALUES(?,?,?,?,?,?,?)",
            (model.version, model.name, spec_json, int(model.num_classes),
             json.dumps(list(model.class_names)), int(h), int(w)),
        )

    def put_run(
        self, conn: sqlite3.Connection, run_id: str, started: float, target_version: str,
        competitor_versions: Sequence[str], sources: Sequence[str], resolution: tuple[int, int],
    ) -> None:
        conn.execute(
            "INSERT OR IGNORE INTO runs VALUES(?,?,?,?,?,?)",
            (run_id, started, target_version, json.dumps(list(competitor_versions)),
             json.dumps([str(s) for s in sources]), f"{resolution[0]}x{resolution[1]}"),
        )

    @staticmethod
    def put_files(conn: sqlite3.Connection, rows: Iterable[tuple]) -> None:
        """Rows ``(path, size, mtime_ns, image_id, error, seen_run, scanned_at)``."""
        conn.executemany("INSERT OR REPLACE INTO files VALUES(?,?,?,?,?,?,?)", rows)


def open_store(store_dir: str | os.PathLike[str]) -> ScoreStore:
    """Open an existing store read-only (MadsegError if it is not one)."""
    return ScoreStore(store_dir, writer_rank=None)


def read_label_map(
    store_dir: str | os.PathLike[str], model_version: str, image_id: str, size: tuple[int, int] | None = None
) -> np.ndarray:
    """(h, w) uint8 label map of ``model_version`` for ``image_id`` at the working resolution, or
    resized (nearest neighbour) to ``size`` = (H, W) — pass ``(info.height, info.width)`` of
    :func:`iter_images` for the original image size."""
    with open_store(store_dir) as st:
        return st.read_label_map(model_version, image_id, size)


def read_areas(
    store_dir: str | os.PathLike[str], model_version: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids (N,), areas (N, C) float32, entropy (N,))`` of one model version, sorted by id."""
    with open_store(store_dir) as st:
        return st.read_areas(model_version)


def read_distances(
    store_dir: str | os.PathLike[str], target_version: str, competitor_version: str, metric: str = "miou"
) -> tuple[np.ndarray, np.ndarray]:
    """``(ids (N,), d (N,))`` for one (target, competitor) version pair, sorted by id."""
    with open_store(store_dir) as st:
        return st.read_distances(target_version, competitor_version, metric)


def iter_images(store_dir: str | os.PathLike[str]) -> Iterator[ImageInfo]:
    """Every decoded image of the store, sorted by id (streamed)."""
    with open_store(store_dir) as st:
        yield from st.iter_images()


def image_paths(store_dir: str | os.PathLike[str], ids: Iterable[str]) -> list[str | None]:
    """A path (or URL) for each image id (None if unknown)."""
    with open_store(store_dir) as st:
        return [st.image_path(i) for i in ids]


def list_models(store_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Models that have predictions in the store (version, name, spec, classes, input size)."""
    with open_store(store_dir) as st:
        return st.list_models()


def list_runs(store_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Score runs recorded in the store, oldest first."""
    with open_store(store_dir) as st:
        return st.list_runs()


def merge_shards(store_dir: str | os.PathLike[str], *, wal: bool = True) -> Path:
    """Fold every shard into the lowest-numbered one; returns its path.

    One transaction copies all rows (``INSERT OR IGNORE``; for ``files`` the most recent scan
    wins), then the other shard files are deleted. Must run when no other process writes.
    """
    root = Path(store_dir)
    shards = sorted((root / SHARD_DIR).glob("shard-*.sqlite"))
    if not shards:
        raise MadsegError(f"{root}: no shards to merge")
    main = shards[0]
    if len(shards) == 1:
        return main
    conn = _connect(main, wal=wal, readonly=False)
    try:
        for i, other in enumerate(shards[1:]):
            # make sure the other shard has its schema (it may be empty)
            _connect(other, wal=wal, readonly=False).close()
            conn.execute(f"ATTACH DATABASE ? AS s{i}", (str(other),))
        conn.execute("BEGIN IMMEDIATE")
        try:
            for i in range(len(shards) - 1):
                for table in _TABLES:
                    if table == "files":
                        conn.execute(
                            f"INSERT INTO files SELECT * FROM s{i}.files WHERE true "
                            "ON CONFLICT(path) DO UPDATE SET size=excluded.size, "
                            "mtime_ns=excluded.mtime_ns, image_id=excluded.image_id, error=excluded.error, "
                            "seen_run=excluded.seen_run, scanned_at=excluded.scanned_at "
                            "WHERE excluded.scanned_at > files.scanned_at"
                        )
                    else:
                        conn.execute(f"INSERT OR IGNORE INTO {table} SELECT * FROM s{i}.{table}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        for i in range(len(shards) - 1):
            conn.execute(f"DETACH DATABASE s{i}")
    finally:
        conn.close()
    for other in shards[1:]:
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(str(other) + suffix)
    return main
