"""The dataset index: a data source's samples, targets, file sizes and check verdicts, built once per dataset
version and reused by every start, every rank and every restart.

**What it holds.** Every split's files as ids into one :class:`PathTable` (a folder table, the file names in one
bytes buffer with offsets, per file its size in bytes and what :func:`~fasttrain.data.checks.check_header` said:
format, width, height, whether only Pillow decodes it alike, or why it is unusable), the targets as arrays, the
class and target names and what discovery skipped. About 70 bytes per sample at ImageNet's names, against
~230 for a list of ``str`` per path. ``Split.paths`` of a source from the index is an :class:`IndexedPaths`
view: indexable, iterable and sliced like a list, a ``str`` made on access; the loaders' pre-check
(:func:`~fasttrain.data.checks.precheck`) answers from its verdicts without opening a file.

**Unchecked files.** With ``data.header_checks = read`` (``auto`` at 50,000 files listed under the root or more) the
build opens no file: each is stat'ed in the walk (the stat the fingerprint needs anyway) and every input stored
*unchecked* (verdict code 254, size -1).
The pre-check keeps such a file with no header, and the loader judges it by the same rules from the bytes it
reads (:func:`~fasttrain.data.checks.read_checked`), skipping it as the pre-check would. A fully checked index
serves every setting; an index with unchecked files serves ``read`` and is built again, checked, for a start that
resolves to ``start``.

**When it is current.** An index is keyed by the discovery settings (``data.format``, the split folders,
``manifest``, ``target_columns``, ``val_fraction``, ``split_seed``, ``max_samples``, ``max_image_pixels``)
and holds the *listing fingerprint* of the data root: a hash over every visible entry under ``data.root``
(hidden ones skipped, linked folders followed once, as discovery walks), each file's relative path, size and
modification time (ns). A start walks the tree (one readdir per folder, one stat per file: no file is opened)
and reuses the index when the fingerprint matches. Anything created, removed, renamed, resized or touched
under the root makes it stale, and it is rebuilt (listing and header checks: the cold cost). What the
fingerprint cannot see is a file rewritten in place with the same size and modification time; its verdict is
then stale: a file that went bad fails at decode and is skipped and counted like any file that fails
mid-run; a file that was repaired stays skipped until ``fasttrain index DATA`` is run again (which always
rebuilds).

**Where it lives.** ``DATA/.fasttrain-index/index-<key>.npz`` (written by ``fasttrain index``, which needs the
data folder writable, and found by every node that sees the data), else ``$FASTTRAIN_CACHE/index/`` (written
by ``train`` and friends, which never write into a user's data folder, and by ``fasttrain index`` when the data
folder is read-only). Written atomically (:func:`fasttrain.io.atomic_replace`); only files named
``index-*.npz`` under those folders are ever replaced. Arrays only: ``np.load(allow_pickle=False)``.

**Under torchrun.** Rank 0 walks, loads or builds the index and broadcasts its bytes
(:func:`fasttrain.distributed.broadcast_object`); the other ranks neither list nor check. A broadcast does
not need the data folder (or a cache) shared between nodes, and costs each rank one receive of a few tens of
MB at ImageNet size instead of a walk of 1.3 M files; rank 0's error (a bad layout) is raised on every rank.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import time
import zipfile
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np

from fasttrain import config as _config
from fasttrain.config import ConfigError, DataConfig, default_workers, resolve_header_checks
from fasttrain.data.checks import FileVerdict, ImageInfo, check_files_stat, image_info
from fasttrain.data.files import BRACE, URL, is_shard_root
from fasttrain.data.sources import (
    DataSource,
    Listed,
    Split,
    discover,
    find_source,
    listed_once,
    not_a_folder,
    note_progress,
    progress,
    walk_folders,
)
from fasttrain.data.vectors import Vectors
from fasttrain.registry import INDEXED_FORMATS

log = logging.getLogger(__name__)

__all__ = [
    "INDEX_DIR",
    "INDEX_VERSION",
    "DatasetIndex",
    "IndexResult",
    "IndexedPaths",
    "Listing",
    "PathTable",
    "build_index",
    "index_key",
    "index_paths",
    "indexed_source",
    "listing",
    "load_or_build",
]

INDEX_VERSION = 5
"""Raised whenever what discovery finds for the same settings changes (2: a folder is one split, so
``val_dir = test_dir`` has no test split; 3: images of formats fasttrain does not read, GIF or HEIC, are named
among the skipped files; 4: a manifest with a label column holds classes; 5: validation/ beside class folders
is refused as a class, and val/ beside them is the validation split): an index of an older version is built
again, not trusted."""
INDEX_DIR = ".fasttrain-index"
FORMATS = ("jpeg", "png", "bmp", "tiff", "webp", "pnm", "jpeg2000")
_BAD, _UNCHECKED = 255, 254
_KEY_FIELDS = (
    "format",
    "train_dir",
    "val_dir",
    "test_dir",
    "manifest",
    "target_columns",
    "val_fraction",
    "split_seed",
    "max_samples",
    "max_image_pixels",
)
"""The data settings that change what discovery finds or what the checks say (others, e.g. image_size, do not)."""


class IndexUnsupported(ValueError):
    """The source cannot be indexed (a file outside data.root, targets of another type): discovery is used."""


# -- the compact path table ---------------------------------------------------------------------------------


class PathTable:
    """Many file paths in a few arrays: ``folders`` (relative to the root, "" for the root itself),
    ``folder_of`` (int32 per file), the UTF-8 / surrogate-escaped names in one buffer with int64 offsets, and
    per file its size and check verdict (``fmt``: index into :data:`FORMATS`, 254 unchecked, 255 bad; ``sizes``:
    bytes, as the check found them, -1 for a file not opened: unchecked)."""

    def __init__(
        self,
        root: str,
        folders: list[str],
        folder_of: np.ndarray,
        names: bytes,
        offsets: np.ndarray,
        sizes: np.ndarray,
        fmt: np.ndarray,
        width: np.ndarray,
        height: np.ndarray,
        pil: np.ndarray,
        reasons: dict[int, str],
        max_pixels: int,
    ):
        # offsets and folder_of live in array('q') / array('i'): Python-level scalar access ~5x faster than numpy's
        self._off = array("q", np.ascontiguousarray(offsets, dtype=np.int64).tobytes())
        self._fold = array("i", np.ascontiguousarray(folder_of, dtype=np.int32).tobytes())
        self.folders, self.names = folders, names
        self.sizes, self.fmt, self.width, self.height, self.pil = sizes, fmt, width, height, pil
        self.reasons, self.max_pixels = reasons, max_pixels
        self.set_root(root)

    @property
    def offsets(self) -> np.ndarray:
        return np.frombuffer(self._off, dtype=np.int64)

    @property
    def folder_of(self) -> np.ndarray:
        return np.frombuffer(self._fold, dtype=np.int32)

    def set_root(self, root: str) -> None:
        """Paths are made under ``root`` (the same relative layout on another node's mount point)."""
        self.root = root
        self._prefix = [os.path.join(root, d, "") if d else os.path.join(root, "") for d in self.folders]

    def __len__(self) -> int:
        return len(self._fold)

    def path(self, i: int) -> str:
        a, b = self._off[i], self._off[i + 1]
        return self._prefix[self._fold[i]] + os.fsdecode(self.names[a:b])

    def __getstate__(self) -> dict:  # the prefixes are remade from the root
        return {k: v for k, v in self.__dict__.items() if k != "_prefix"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.set_root(state["root"])

    def info(self, i: int) -> ImageInfo | None:
        f = int(self.fmt[i])
        if f >= _UNCHECKED:
            return None
        return ImageInfo(FORMATS[f], int(self.width[i]), int(self.height[i]), bool(self.pil[i]))

    @property
    def nbytes(self) -> int:
        arrays = (self.folder_of, self.offsets, self.sizes, self.fmt, self.width, self.height, self.pil)
        return (
            len(self.names)
            + sum(a.nbytes for a in arrays)
            + sum(len(d) + 49 for d in self.folders)
            + sum(len(r) + 49 + 28 for r in self.reasons.values())
        )


class IndexedPaths(Sequence[str]):
    """A split's paths: ids into a :class:`PathTable`. Behaves like the ``list[str]`` it stands for (length,
    indexing, slicing, iteration, ``==`` against a list); each ``str`` is made when asked for."""

    def __init__(self, table: PathTable, ids: np.ndarray):
        self.table, self.ids = table, ids

    def __len__(self) -> int:
        return len(self.ids)

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> IndexedPaths: ...
    def __getitem__(self, i: int | slice) -> str | IndexedPaths:
        if isinstance(i, slice):
            return IndexedPaths(self.table, self.ids[i])
        return self.table.path(int(self.ids[i]))

    def __iter__(self) -> Iterator[str]:
        path = self.table.path
        for i in self.ids.tolist():
            yield path(i)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, IndexedPaths) and other.table is self.table:
            return bool(np.array_equal(self.ids, other.ids))
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        head = ", ".join(repr(p) for p in self[:3])
        return f"IndexedPaths([{head}{', ...' if len(self) > 3 else ''}] {len(self)} paths)"

    def take(self, indices: Sequence[int]) -> IndexedPaths:
        """The paths at ``indices`` (what ``Split.subset`` asks for), without making a ``str``."""
        return IndexedPaths(self.table, self.ids[np.asarray(indices, dtype=np.int64)])

    def indexed_precheck(
        self, max_pixels: int, unchecked: bool = False
    ) -> tuple[list[int], list[ImageInfo | None], list[tuple[str, str]]] | None:
        """(kept positions, their headers, (path, reason) of the others) from the index's verdicts; None when the
        verdicts were made under another pixel limit, or some file was never checked (an index built with
        ``data.header_checks = read``) and ``unchecked`` is False (the caller checks). With ``unchecked`` such
        files are kept, their header None: the loader checks each when it reads it."""
        t = self.table
        fmt = t.fmt[self.ids]
        todo = fmt == _UNCHECKED
        if max_pixels != t.max_pixels or (not unchecked and bool(todo.any())):
            return None
        good = np.flatnonzero(fmt != _BAD)
        known = np.flatnonzero(fmt[good] != _UNCHECKED)
        g = self.ids[good[known]]
        infos: list[ImageInfo | None] = [None] * len(good)
        for k, info in zip(known.tolist(), _infos(fmt[good[known]], t.width[g], t.height[g], t.pil[g])):
            infos[k] = info
        bad = [(self[i], t.reasons.get(int(self.ids[i]), "unreadable")) for i in np.flatnonzero(fmt == _BAD).tolist()]
        return good.tolist(), infos, bad


# -- the listing fingerprint ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Listing:
    fingerprint: str
    """Hash of (relative path, size, mtime_ns) of every visible file under the root, in walk order."""
    files: int
    folders: int
    seconds: float


def listing(root: str | os.PathLike) -> Listing:
    """The root's listing fingerprint (see the module docstring): one readdir per folder, one stat per file."""
    t0 = time.perf_counter()
    h = hashlib.blake2b(digest_size=16)
    files = folders = 0
    for d, entries in walk_folders(Path(root), warn=False):
        folders += 1
        names, stats = [], array("q")
        for e in entries:
            note_progress()
            try:
                if e.is_dir():
                    continue
                st = e.stat()
                stats.extend((st.st_size, st.st_mtime_ns))
            except OSError:  # a broken link, a link loop: listed by name, without a size
                stats.extend((-1, -1))
            names.append(e.name)
        files += len(names)
        _hash_folder(h, root, d, names, stats)
    return Listing(h.hexdigest(), files, folders, time.perf_counter() - t0)


def _hash_folder(h: Any, root: str | os.PathLike, d: str | os.PathLike, names: list[str], stats: array) -> None:
    h.update(os.fsencode(os.path.relpath(d, root)) + b"\0" + os.fsencode("\0".join(names)) + b"\1")
    h.update(stats.tobytes())


class _Walk:
    """The one walk of a build: each folder's entries (what discovery is then given, :func:`listed_once`) and
    each file's (size, mtime_ns) for the fingerprint, as :func:`listing` takes them. A file that is not image-named
    is stat'ed during the walk, before discovery reads any (a manifest); an image file is stat'ed when its header
    is checked (the fstat before its first byte is read), or after the checks when discovery did not take it.
    When the build will not check headers (``data.header_checks = read``; auto: once ``stat_images_from`` files
    were listed, the walk's count deciding) the image files are stat'ed during the walk too, from their entries."""

    def __init__(self, root: str, stat_images_from: int | None = None):
        self.root, self.t0 = root, time.perf_counter()
        self.listed: dict[str, Listed] = {}
        self.order: list[tuple[str, list[str], array]] = []  # (folder, file names, their stats; -2: later)
        self.files = 0
        early: list[tuple[array, list]] = []  # auto: the folders listed before the count decided, entries kept
        for d, entries in walk_folders(Path(root), warn=False):
            got = self.listed[str(d)] = Listed.of(entries)
            files = [e for e, k in zip(entries, got.kinds) if k != "d"]
            self.files += len(files)
            if stat_images_from is not None and self.files >= stat_images_from:
                stats = _stats(files)
                for held, those in early:  # the count decided: the folders before it too, from their entries
                    held[:] = _stats(those)
                early.clear()
            else:
                stats = array("q", [-2]) * (2 * len(files))
                kinds = [k for k in got.kinds if k != "d"]
                if "f" in got.kinds or "o" in got.kinds:
                    for j, (e, k) in enumerate(zip(files, kinds)):
                        if k != "i":
                            stats[2 * j : 2 * j + 2] = array("q", _stat(e))
                if stat_images_from is not None:
                    early.append((stats, files))
            self.order.append((str(d), [e.name for e in files], stats))

    def listing(self, ids: dict[str, int], checked: np.ndarray) -> Listing:
        """The fingerprint :func:`listing` gives of the tree as walked, the stats of checked files taken from
        the checks (``checked[ids[path]]``: (st_size, st_mtime_ns), -2 where not taken), the others' taken now."""
        h = hashlib.blake2b(digest_size=16)
        files = 0
        for d, names, stats in self.order:
            files += len(names)
            base = os.path.join(d, "")
            st = np.frombuffer(stats, dtype=np.int64).reshape(-1, 2)
            later = np.flatnonzero(st[:, 0] == -2)
            if len(later) and len(checked):
                got = np.array([ids.get(base + names[j], -1) for j in later.tolist()], dtype=np.int64)
                st[later] = np.where(got[:, None] >= 0, checked[got], -2)
                for j in np.flatnonzero(st[:, 0] == -2).tolist():
                    st[j] = _stat(base + names[j])
            _hash_folder(h, self.root, d, names, stats)
        return Listing(h.hexdigest(), files, len(self.order), time.perf_counter() - self.t0)


def _stats(entries: list) -> array:
    """(st_size, st_mtime_ns) of each entry, one after another (as :func:`_stat` gives them)."""
    out = array("q")
    try:
        for e in entries:
            note_progress()
            st = e.stat()
            out.append(st.st_size)
            out.append(st.st_mtime_ns)
    except OSError:  # one that cannot be stat'ed (a broken link): entry by entry
        return array("q", [v for e in entries for v in _stat(e)])
    return out


def _stat(e: os.DirEntry | str) -> tuple[int, int]:
    note_progress()
    try:
        st = e.stat() if isinstance(e, os.DirEntry) else os.stat(e)
    except OSError:  # a broken link, a link loop: listed by name, without a size
        return -1, -1
    return st.st_size, st.st_mtime_ns


def index_key(data: DataConfig) -> str:
    """The discovery settings' hash (with the index version): part of the index's file name. A format
    registered from outside may read any data setting: all of them (but the root) key its index."""
    if data.format in INDEXED_FORMATS:
        fields = {k: getattr(data, k) for k in _KEY_FIELDS}
    else:
        fields = {k: v for k, v in dataclasses.asdict(data).items() if k not in ("root", "header_checks")}
    text = json.dumps({"version": INDEX_VERSION, **fields}, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _cache_dir() -> Path:
    from fasttrain.data.synthetic import default_cache_dir

    return default_cache_dir() / "index"


def index_paths(data: DataConfig, root: str | os.PathLike) -> tuple[Path, Path]:
    """(beside the data, in the cache) for this root and these settings; the cache's name holds the root too."""
    key = index_key(data)
    where = hashlib.blake2b(os.fsencode(os.path.abspath(root)), digest_size=8).hexdigest()
    return Path(root) / INDEX_DIR / f"index-{key}.npz", _cache_dir() / f"index-{where}-{key}.npz"


# -- the index ------------------------------------------------------------------------------------------------


@dataclass
class DatasetIndex:
    """A data source in arrays (see the module docstring); :meth:`source` gives it back as a DataSource."""

    format: str
    key: str
    fingerprint: str
    files: int
    """Files in the listing (every visible file under the root, samples or not)."""
    table: PathTable
    splits: dict[str, tuple[np.ndarray, str, Any]]
    """name -> (path ids, target kind: class | vector | path | const, the targets: an array, or the str)."""
    class_names: list[str] | None = None
    target_names: list[str] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """Discovery's (file, reason), paths relative to the root where they lie under it."""

    @property
    def samples(self) -> int:
        return sum(len(ids) for ids, _, _ in self.splits.values())

    @property
    def unchecked(self) -> int:
        """Input files whose header was not checked when the index was built (``data.header_checks = read``)."""
        mask = np.zeros(len(self.table), dtype=bool)
        for ids, _, _ in self.splits.values():
            mask[ids] = True
        return int((mask & (self.table.fmt == _UNCHECKED)).sum())

    @property
    def bad(self) -> list[tuple[str, str]]:
        """(path, reason) of every file the checks refused."""
        return [(self.table.path(i), why) for i, why in sorted(self.table.reasons.items())]

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (arrays, the string tables), what :meth:`source`'s Splits share."""
        total = self.table.nbytes
        for ids, _, targets in self.splits.values():
            total += ids.nbytes + (targets.nbytes if isinstance(targets, np.ndarray) else 0)
        return total

    def source(self, root: str | os.PathLike | None = None) -> DataSource:
        """The DataSource discovery would give (paths as :class:`IndexedPaths` under ``root``, default the
        root it was built under)."""
        if root is not None:
            self.table.set_root(str(root))
        base = self.table.root
        splits: dict[str, Split] = {}
        for name, (ids, kind, targets) in self.splits.items():
            splits[name] = Split(
                name, IndexedPaths(self.table, ids), _targets_list(self.table, kind, targets, len(ids))
            )
        skipped = [(os.path.join(base, f), why) for f, why in self.skipped]
        return DataSource(
            Path(base),
            self.format,
            splits["train"],
            splits.get("val"),
            splits.get("test"),
            class_names=self.class_names,
            target_names=self.target_names,
            skipped=skipped,
        )

    # -- bytes: npz of arrays and one JSON record, no pickles
    def to_bytes(self) -> bytes:
        t = self.table
        meta = {
            "version": INDEX_VERSION,
            "format": self.format,
            "key": self.key,
            "fingerprint": self.fingerprint,
            "files": self.files,
            "root": t.root,
            "folders": t.folders,
            "reasons": [[i, r] for i, r in sorted(t.reasons.items())],
            "max_pixels": t.max_pixels,
            "class_names": self.class_names,
            "target_names": self.target_names,
            "skipped": self.skipped,
            "splits": {n: [kind, None if isinstance(v, np.ndarray) else v] for n, (_, kind, v) in self.splits.items()},
        }
        arrays = {
            "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
            "names": np.frombuffer(t.names, dtype=np.uint8),
            "offsets": t.offsets,
            "folder_of": t.folder_of,
            "sizes": t.sizes,
            "fmt": t.fmt,
            "width": t.width,
            "height": t.height,
            "pil": t.pil,
        }
        for n, (ids, _, v) in self.splits.items():
            arrays[f"ids_{n}"] = ids
            if isinstance(v, np.ndarray):
                arrays[f"targets_{n}"] = v
        buf = io.BytesIO()
        np.savez(buf, **arrays)  # type: ignore[arg-type]
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes | Path) -> DatasetIndex:
        """An index from :meth:`to_bytes`' bytes or a file; ValueError when it is not one (or another version)."""
        try:
            with np.load(io.BytesIO(data) if isinstance(data, bytes) else data, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            meta = json.loads(arrays.pop("meta").tobytes())
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"not a fasttrain dataset index ({e})") from None
        if not isinstance(meta, dict) or meta.get("version") != INDEX_VERSION:
            raise ValueError("a dataset index of another version")
        try:
            return cls._from_parts(meta, arrays)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a fasttrain dataset index ({type(e).__name__}: {e})") from None

    @classmethod
    def _from_parts(cls, meta: dict, arrays: dict[str, np.ndarray]) -> DatasetIndex:
        table = PathTable(
            meta["root"],
            meta["folders"],
            arrays["folder_of"],
            arrays["names"].tobytes(),
            arrays["offsets"],
            arrays["sizes"],
            arrays["fmt"],
            arrays["width"],
            arrays["height"],
            arrays["pil"],
            {int(i): r for i, r in meta["reasons"]},
            int(meta["max_pixels"]),
        )
        splits = {
            n: (arrays[f"ids_{n}"], kind, arrays[f"targets_{n}"] if value is None else value)
            for n, (kind, value) in meta["splits"].items()
        }
        return cls(
            meta["format"],
            meta["key"],
            meta["fingerprint"],
            meta["files"],
            table,
            splits,
            meta["class_names"],
            meta["target_names"],
            [tuple(s) for s in meta["skipped"]],
        )


def _infos(fmt: np.ndarray, width: np.ndarray, height: np.ndarray, pil: np.ndarray) -> list[ImageInfo]:
    """ImageInfo per file, one object per distinct header (a dataset holds few sizes: made once each)."""
    w, h = width.astype(np.int64), height.astype(np.int64)
    if len(w) and max(int(w.max()), int(h.max())) >= 2**28:
        return [image_info(FORMATS[f], a, b, p == 1) for f, a, b, p in zip(*(x.tolist() for x in (fmt, w, h, pil)))]
    key = ((w << 28 | h) << 4 | fmt.astype(np.int64)) << 1 | pil.astype(np.int64)
    distinct, inverse = np.unique(key, return_inverse=True)
    made = [image_info(FORMATS[k >> 1 & 15], k >> 33, k >> 5 & (2**28 - 1), bool(k & 1)) for k in distinct.tolist()]
    return list(map(made.__getitem__, inverse.ravel().tolist()))


def _targets_list(table: PathTable, kind: str, targets: Any, n: int) -> Sequence[Any]:
    if kind == "class":
        shared = list(range(int(targets.max()) + 1 if len(targets) else 0))  # one int object per class
        return list(map(shared.__getitem__, targets.tolist()))
    if kind == "vector":
        return Vectors(targets)  # one array, not a list of float lists per sample
    if kind == "path":
        return IndexedPaths(table, targets)
    return [targets] * n  # const: one str for every sample (paired side-by-side images)


# -- building ---------------------------------------------------------------------------------------------------


class _TableBuilder:
    """Paths (absolute, under ``root``) -> ids, folders and names collected once each."""

    def __init__(self, root: str):
        self.root, self.base = root, os.path.join(root, "")
        self.folders: dict[str, int] = {}
        self.ids: dict[str, int] = {}
        self.folder_of = array("i")
        self.names: list[str] = []
        self._of_dir: dict[str, int] = {}

    def add(self, path: str) -> int:
        got = self.ids.get(path)
        if got is not None:
            return got
        cut = path.rfind(os.sep)
        d, name = path[:cut], path[cut + 1 :]
        folder = self._of_dir.get(d)
        if folder is None:
            folder = self._of_dir[d] = self._folder(d, path)
        self.folder_of.append(folder)
        self.names.append(name)
        got = self.ids[path] = len(self.names) - 1
        return got

    def _folder(self, d: str, path: str) -> int:
        if d == self.root:
            rel = ""
        elif d.startswith(self.base):
            rel = d[len(self.base) :]
        else:
            raise IndexUnsupported(f"{path} lies outside data.root {self.root}")
        if os.path.join(self.root, rel, "x") != d + os.sep + "x":  # "a//b", "a/./b": not how discovery spells it
            raise IndexUnsupported(f"{path} is not a plain path under {self.root}")
        return self.folders.setdefault(rel, len(self.folders))

    def ids_of(self, paths: Sequence[str]) -> np.ndarray:
        ids, add = self.ids, self.add
        out = array("q", [got if (got := ids.get(p)) is not None else add(p) for p in paths])
        return np.frombuffer(out, dtype=np.int64).copy()

    def packed_names(self) -> tuple[bytes, np.ndarray]:
        """(the names' bytes, one after another; offsets, one more than names)."""
        joined = os.fsencode("".join(self.names))
        lengths = [len(n) for n in self.names]
        if len(joined) != sum(lengths):  # names beyond ASCII: one encoding each
            encoded = [os.fsencode(n) for n in self.names]
            joined, lengths = b"".join(encoded), [len(b) for b in encoded]
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return joined, offsets


def _encode_targets(targets: Sequence[Any], tb: _TableBuilder) -> tuple[str, Any]:
    """(kind, stored targets) for a split's targets; IndexUnsupported for a mix or another type."""
    from fasttrain.data.formats import SIDE_BY_SIDE

    if not targets or all(type(t) is int for t in targets):
        return "class", np.asarray(targets, dtype=np.int32 if not targets or max(targets) < 2**31 else np.int64)
    if all(isinstance(t, str) for t in targets):
        if all(t == SIDE_BY_SIDE for t in targets):
            return "const", SIDE_BY_SIDE
        return "path", tb.ids_of(targets)
    if all(isinstance(t, list) and all(type(v) is float for v in t) for t in targets):
        arr = np.asarray(targets, dtype=np.float64)
        if arr.ndim == 2 and arr.tolist() == list(targets):
            return "vector", arr
    raise IndexUnsupported("targets of a type the index does not store")


def _relative(root: str, path: str) -> str:
    base = os.path.join(root, "")
    return path[len(base) :] if path.startswith(base) else path


def build_index(
    data: DataConfig, root: str | os.PathLike, *, threads: int = 0, header_checks: str | None = None
) -> DatasetIndex:
    """Discover the source, check every input file's header (see ``header_checks``), pack it all (see
    :func:`_build`)."""
    return _build(data, str(root), threads, header_checks)[0]


def _build(data: DataConfig, root: str, threads: int, header_checks: str | None = None) -> tuple[DatasetIndex, Listing]:
    """Discover the source (``data.format``'s own discovery), check every input file's header, and pack it all
    into a :class:`DatasetIndex`. One walk of the tree serves the fingerprint and the discovery (:class:`_Walk`);
    it is taken first, and each checked file's stat before its bytes are read, so a change during the build
    makes the index stale at the next start rather than wrongly current.

    ``header_checks`` (default ``data.header_checks``; auto: by the number of files listed under the root, see
    :func:`~fasttrain.config.resolve_header_checks`): ``read`` opens no file, each file is only stat'ed in the
    walk (the stat the fingerprint takes anyway) and every input stored unchecked, for the loaders to check as
    they read it."""
    checks = header_checks or data.header_checks
    walk = _Walk(root, {"start": None, "read": 0}.get(checks, _auto_threshold()))
    with listed_once(walk.listed):
        src = find_source(data, root)
    tb = _TableBuilder(root)
    splits: dict[str, tuple[np.ndarray, str, Any]] = {}
    inputs: list[np.ndarray] = []
    for split in (src.train, src.val, src.test):
        if split is None:
            continue
        ids = tb.ids_of(split.paths)
        inputs.append(ids)
        splits[split.name] = (ids, *_encode_targets(split.targets, tb))
    inputs_mask = np.zeros(len(tb.names), dtype=bool)
    for ids in inputs:
        inputs_mask[ids] = True
    todo = np.flatnonzero(inputs_mask)
    paths = list(tb.ids)  # insertion order: id -> path
    if resolve_header_checks(checks, walk.files) == "read":  # no file opened: the walk's stats, every input unchecked
        table = _table(tb, todo, [], data.max_image_pixels)
        seen = walk.listing(tb.ids, np.full((len(paths), 2), -2, dtype=np.int64))  # what the walk did not stat
    else:
        todo_paths = [paths[i] for i in todo.tolist()]
        verdicts = check_files_stat(todo_paths, data.max_image_pixels, threads or _threads())
        table = _table(tb, todo, verdicts, data.max_image_pixels)
        checked = np.full((len(paths), 2), -2, dtype=np.int64)
        took = [(i, v[3]) for i, v in zip(todo.tolist(), verdicts) if v[3] is not None]
        if took:
            checked[[i for i, _ in took]] = [st for _, st in took]
        seen = walk.listing(tb.ids, checked)
    skipped = [(_relative(root, f), why) for f, why in src.skipped]
    idx = DatasetIndex(
        src.format, index_key(data), seen.fingerprint, seen.files, table, splits,
        src.class_names, src.target_names, skipped,
    )  # fmt: skip
    return idx, seen


def _table(tb: _TableBuilder, todo: np.ndarray, verdicts: list[FileVerdict], max_pixels: int) -> PathTable:
    n = len(tb.names)
    fmt = np.full(n, _UNCHECKED, dtype=np.uint8)
    width, height = np.zeros(n, dtype=np.uint32), np.zeros(n, dtype=np.uint32)
    pil, sizes = np.zeros(n, dtype=np.uint8), np.full(n, -1, dtype=np.int64)  # -1: not opened (as FileVerdict)
    reasons: dict[int, str] = {}
    code = {f: i for i, f in enumerate(FORMATS)}
    good: list[int] = []
    rows: list[tuple[int, int, int, int]] = []
    for i, (info, why, size, _) in zip(todo.tolist(), verdicts):
        sizes[i] = size
        if info is None:
            fmt[i], reasons[i] = _BAD, why or "unreadable"
        else:
            good.append(i)
            rows.append((code[info.format], info.width, info.height, info.pil))
    if good:
        cols = np.array(rows, dtype=np.int64).reshape(-1, 4)
        fmt[good], width[good], height[good], pil[good] = cols[:, 0], cols[:, 1], cols[:, 2], cols[:, 3]
    names, offsets = tb.packed_names()
    return PathTable(
        tb.root, list(tb.folders), np.frombuffer(tb.folder_of.tobytes(), dtype=np.int32), names,
        offsets, sizes, fmt, width, height, pil, reasons, max_pixels,
    )  # fmt: skip


def _auto_threshold() -> int:
    """data.header_checks = auto: the files listed from which a build does not check (read when asked)."""
    return _config.HEADER_CHECKS_AT_START_BELOW


def _threads() -> int:
    """Header checks wait on the disk more than on the CPU (a network file system most of all)."""
    return max(4, min(16, 2 * default_workers()))


# -- finding, saving, sharing -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexResult:
    index: DatasetIndex
    reused: bool
    """True: an index on disk was current; False: built now."""
    path: Path | None
    """Where it was read from or written to (None: written nowhere)."""
    listing: Listing
    seconds: float


def _load_current(candidates: Sequence[Path], key: str, seen: Listing) -> tuple[DatasetIndex, Path] | None:
    for path in candidates:
        if not path.is_file():
            continue
        try:
            idx = DatasetIndex.from_bytes(path)
        except ValueError as e:
            log.info("dataset index %s not used: %s", path, e)
            continue
        if idx.key == key and idx.fingerprint == seen.fingerprint:
            return idx, path
        log.info("dataset index %s is stale (files under the data root changed): rebuilding", path)
    return None


def _save(idx: DatasetIndex, candidates: Sequence[Path]) -> Path | None:
    """Write to the first place that takes it (atomically); None (and a warning) when none does."""
    from fasttrain.io import atomic_replace

    data = idx.to_bytes()
    for path in candidates:
        folder = path.parent
        if folder.exists() and not folder.is_dir() or path.exists() and not path.is_file():
            log.info("not writing the dataset index to %s: a file of that name is in the way", path)
            continue
        try:
            return atomic_replace(path, lambda tmp: _write(tmp, data))
        except OSError as e:
            log.info("cannot write the dataset index to %s: %s", path, getattr(e, "reason", None) or e)
    log.warning("the dataset index could not be written (%s): the next start lists and checks again", candidates[-1])
    return None


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def load_or_build(
    data: DataConfig,
    root: str | os.PathLike | None = None,
    *,
    beside: bool = False,
    rebuild: bool = False,
    header_checks: str | None = None,
) -> IndexResult:
    """The current index of ``root`` (default ``data.root``) for these settings: read from beside the data or
    the cache when its listing fingerprint matches, else built and written (``beside``: into
    ``DATA/.fasttrain-index`` first, else the cache only). ``rebuild``: build even when one is current.
    ``header_checks`` (default ``data.header_checks``): an index with every header checked serves any setting;
    one built without the checks (``read``) serves ``read``, and is built again, checked, where the setting
    resolves to ``start``."""
    checks = header_checks or data.header_checks
    t0 = time.perf_counter()
    root = Path(root if root is not None else data.root).expanduser()
    if not root.is_dir():
        raise not_a_folder(root)
    here, cached = index_paths(data, root)
    if not rebuild and (here.is_file() or cached.is_file()):  # else nothing to compare: the build's walk lists
        seen = listing(root)
        found = _load_current((here, cached), index_key(data), seen)
        if found is not None:
            idx, path = found
            idx.table.set_root(str(root))
            unchecked = idx.unchecked
            if not unchecked or resolve_header_checks(checks, idx.files) == "read":
                return IndexResult(idx, True, path, seen, time.perf_counter() - t0)
            log.info("dataset index %s: %d files unchecked, header_checks = %s: rebuilding", path, unchecked, checks)
    idx, seen = _build(data, str(root), 0, checks)
    saved = _save(idx, (here, cached) if beside else (cached,))
    return IndexResult(idx, False, saved, seen, time.perf_counter() - t0)


def describe(result: IndexResult) -> str:
    """One line: what was indexed, how, where."""
    idx = result.index
    how = "reused" if result.reused else "built"
    where = f" ({result.path})" if result.path else " (not saved)"
    per = idx.nbytes / max(1, idx.samples)
    return (
        f"dataset index {how}{where}: {idx.samples} samples in {', '.join(idx.splits)}, "
        f"{len(idx.table.reasons)} bad, {f'{n} unchecked (checked as read), ' if (n := idx.unchecked) else ''}"
        f"{len(idx.skipped)} skipped at discovery, {idx.files} files listed, "
        f"{result.seconds:.2f} s, {per:.0f} B/sample in memory"
    )


def _sourced(
    data: DataConfig, root: Path, prebuilt: Callable[[DataConfig, Path], IndexResult | None] | None = None
) -> tuple[DataSource, DatasetIndex | None]:
    """Rank 0's (or one process's) source, and the index to share (None: the source is not indexed).
    ``prebuilt(data, root)``: what :func:`load_or_build` would give, built elsewhere, or None (see
    :func:`indexed_source`)."""
    try:
        result = (prebuilt and prebuilt(data, root)) or load_or_build(data, root)
    except IndexUnsupported as e:
        log.info("dataset not indexed (%s): every start discovers it", e)
        return find_source(data, root), None
    log.info("%s", describe(result))
    return result.index.source(root), result.index


def indexed_source(
    data: DataConfig,
    root: str | os.PathLike | None = None,
    *,
    timeout_s: float = 1800.0,
    prebuilt: Callable[[DataConfig, Path], IndexResult | None] | None = None,
) -> DataSource:
    """What :func:`~fasttrain.data.sources.discover` finds, from the dataset index (built when missing or
    stale). Under torchrun rank 0 alone walks and builds; the others receive its index (or its error).

    Rank 0 alone also decides whether ``data.root`` names tar shards (they carry their own index: every rank
    then discovers them itself): a node whose copy differs or is missing takes rank 0's way, never another
    collective than rank 0's. The other ranks wait for rank 0's answer (ready, or its error) through torchrun's
    store as long as rank 0 beats (a cold listing of a large dataset may take longer than ``timeout_s``,
    dist.timeout_s), and ``timeout_s`` after its beats stop (a rank 0 that died, or whose listing and checks
    stopped moving: frozen in a hung mount, see :func:`~fasttrain.data.sources.note_progress`); only then does the
    index itself come through the process group's broadcast, which rank 0 is ready to send.

    ``prebuilt(data, root)``: one process only: the index as :func:`load_or_build` would give it, read or built
    elsewhere (:func:`fasttrain.data.prebuild.take`: by the command line's child process), or None to build it
    here."""
    from fasttrain import distributed

    given = root if root is not None else data.root
    where = Path(given).expanduser()
    info = distributed.current()
    if not info.enabled:
        if is_shard_root(data.format, given):  # tar shards carry their own index (one per shard): nothing to list
            return discover(data, given)
        src, _ = _sourced(data, where, prebuilt)
        _log_skipped(src)
        return src
    made: dict[str, Any] = {}

    def rank_0() -> tuple:
        try:
            if is_shard_root(data.format, given):
                return ("shards",)
            made["src"], made["payload"] = _sourced(data, where)
        except BaseException as e:  # noqa: BLE001 - raised again on rank 0, said to the others
            made["error"] = e
            return ("error", type(e).__name__, str(e))
        return ("index",) if made["payload"] is not None else ("discover",)

    # A small status through the store while rank 0 beats (rank 0's error comes as the answer); the index bytes
    # then follow.
    # A format registered from outside may list without marking progress: rank 0 then beats unconditionally.
    moving = progress if data.format in INDEXED_FORMATS else None
    got = distributed.decide("dataset-index", rank_0, timeout_s, long=True, progress=moving)
    if got[0] == "error":
        if info.is_main:
            raise made["error"]
        cls = ConfigError if got[1] == "ConfigError" else RuntimeError
        raise cls(got[2] if cls is ConfigError else f"rank 0 could not list the data: {got[1]}: {got[2]}")
    if got[0] == "shards":
        if not info.is_main and not URL.match(os.fspath(given)) and not BRACE.search(os.fspath(given)):
            if not where.exists():  # rank 0 has the shards, this node does not: say so here (agree names the node)
                raise ConfigError(
                    f"data.root: {where} is not a {'file' if where.suffix == '.tar' else 'folder'} on this node"
                )
        return discover(data, given)
    if info.is_main:
        src = made["src"]
        if got[0] == "index":
            distributed.broadcast_object(made["payload"].to_bytes())  # packed only here: one process never needs it
    elif got[0] == "discover":
        src = find_source(data, where)
    else:
        payload = distributed.broadcast_object(None)
        if not where.is_dir():  # rank 0 has the data, this node does not: say so here (agree names the node)
            raise ConfigError(f"data.root: {where} is not a folder on this node")
        src = DatasetIndex.from_bytes(payload).source(where)
        if info.local_rank == 0:  # one process per node looks: a node missing files then disagrees by name
            src = _on_this_node(src)
    _log_skipped(src)
    return src


def _on_this_node(src: DataSource) -> DataSource:
    """Rank 0's source less the files this node does not hold, from one directory listing per folder (nothing
    opened, no stat per file). A node missing files then disagrees with rank 0 folder by folder
    (:func:`fasttrain.agree.check_nodes`), instead of training on data the other nodes do not see."""
    listed: dict[str, set[str]] = {}

    def here(path: str) -> bool:
        folder, name = os.path.split(path)
        if folder not in listed:
            try:
                with os.scandir(folder) as it:
                    listed[folder] = {e.name for e in it}
            except OSError:
                listed[folder] = set()
        return name in listed[folder]

    for attr in ("train", "val", "test"):
        split = getattr(src, attr)
        if split is None:
            continue
        keep = [i for i, p in enumerate(split.paths) if here(p)]
        if len(keep) < len(split):
            setattr(src, attr, split.subset(keep))
    return src


def _log_skipped(src: DataSource) -> None:
    for f, why in src.skipped:
        log.warning("skipped %s: %s", f, why)
