"""``fasttrain pack DATA OUT``: a dataset of files -> WebDataset-style tar shards, an index per shard, a manifest.

The dataset is discovered as training would (``data.format``, its splits or its seeded hold-out), and every
sample's files are copied byte for byte, never decoded: ``<key>.<ext>`` (the image), and ``<key>.cls`` (class
index), ``<key>.json`` (regression targets) or ``<key>.target.<ext>`` (a pair's target image). The training
split is written in a seeded random order (``data.split_seed``; ``order="shuffled"``, the default): discovery
lists a class's files together, and a stream reads a shard whole, through a buffer of a few thousand samples, so
class-sorted shards gave batches of one or two classes. Keys number the samples in the order written; with
``order="source"`` that is discovery order, index i of a split is the same sample from files and from shards,
and training from either draws the same batches. Each shard is followed by ``<shard>.tar.idx`` and the folder by
``shards.json`` (see :mod:`fasttrain.data.shards`). Everything is written into a temporary folder beside OUT and
renamed to OUT at the end; an existing OUT is refused, never overwritten. A file that cannot be read, or that the
loaders' pre-check would refuse (not an image, cut short, beyond ``data.max_image_pixels``: judged on the bytes
read for the copy, :func:`fasttrain.data.checks.read_checked`), is named and skipped, as training skips it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fasttrain.config import ConfigError, DataConfig
from fasttrain.data.files import INDEX_FORMAT, INDEX_SUFFIX, MANIFEST
from fasttrain.data.shards import MANIFEST_FORMAT, TARGET_TAG

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_SHARD_BYTES", "ORDERS", "PackReport", "pack", "parse_size"]

DEFAULT_SHARD_BYTES = 256 * 2**20
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str) -> int:
    """``"64MB"``, ``"1GiB"``, ``"500000"`` -> bytes; ValueError naming ``--shard-size`` otherwise."""
    m = _SIZE.match(str(text))
    unit = (m.group(2) or "").lower().rstrip("b") if m else ""
    if m is None or unit not in _UNITS:
        raise ValueError(f"--shard-size: {text!r} is not a size (e.g. 256MB, 1GiB, 1000000)")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n < 1024:
        raise ValueError(f"--shard-size: {text!r} is under 1 KiB")
    return n


@dataclass
class PackReport:
    out: Path
    counts: dict[str, int] = field(default_factory=dict)
    shards: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0
    order: str = ""
    """The training split's order in its shards: "source", or "shuffled (seed N)"."""

    def to_text(self) -> str:
        parts = ", ".join(f"{s} {n} samples in {self.shards[s]} shards" for s, n in self.counts.items())
        lines = [f"{self.out}: {parts}; {self.bytes / 2**20:.1f} MiB in {self.seconds:.1f} s"]
        if self.order:
            lines.append(f"  training samples in {self.order} order")
        lines += [f"  SKIPPED  {f}: {why}" for f, why in self.skipped]
        return "\n".join(lines)


class _ShardWriter:
    """Shards of one split: ``<split>-000000.tar``, ... each closed (with its index) past ``limit`` bytes."""

    def __init__(self, folder: Path, split: str, limit: int):
        self.folder, self.split, self.limit = folder, split, limit
        self.names: list[str] = []
        self.bytes = 0
        self._tar: tarfile.TarFile | None = None

    def _open(self) -> tarfile.TarFile:
        name = f"{self.split}-{len(self.names):06d}.tar"
        self.names.append(name)
        self._members: list[list[Any]] = []
        self._targets: dict[str, Any] = {}
        self._tar = tarfile.open(self.folder / name, "w", format=tarfile.GNU_FORMAT)
        return self._tar

    def add(self, key: str, members: list[tuple[str, bytes]], target: Any) -> None:
        """One sample's members, kept together in one shard (WebDataset readers need a key's files adjacent)."""
        tar = self._tar or self._open()
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
            padded = (len(data) + 511) // 512 * 512  # the data ends at tar.offset, padded to whole blocks
            self._members.append([name, tar.offset - padded, len(data)])
        if target is not None:
            self._targets[key] = target
        if tar.offset >= self.limit:
            self.close()

    def close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        shard = self.folder / self.names[-1]
        size = shard.stat().st_size
        self.bytes += size
        index = {
            "format": INDEX_FORMAT,
            "version": 1,
            "shard": shard.name,
            "size": size,
            "members": self._members,
            "targets": self._targets,
        }
        (self.folder / (shard.name + INDEX_SUFFIX)).write_text(json.dumps(index, separators=(",", ":")))
        self._tar = None
        log.info("pack: %s, %d members, %.1f MiB", shard.name, len(self._members), size / 2**20)


class _Unusable(Exception):
    def __init__(self, path: str, why: str):
        super().__init__(why)
        self.path, self.why = path, why


def _read(path: str, max_pixels: int) -> bytes:
    """The file's bytes, judged by the loaders' pre-check (:class:`_Unusable` names the file and the reason)."""
    from fasttrain.data.checks import UnusableImage, read_checked

    try:
        return read_checked(path, max_pixels)[0]
    except UnusableImage as e:
        raise _Unusable(path, str(e)) from None


def _sample_members(
    key: str, path: str, target: Any, kind: str, max_pixels: int
) -> tuple[list[tuple[str, bytes]], Any]:
    """The members of one sample and the target its index records (:class:`_Unusable`: a file skipped)."""
    from fasttrain.data.formats import SIDE_BY_SIDE

    ext = (Path(path).suffix or ".img").lower()
    members = [(key + ext, _read(path, max_pixels))]
    if kind == "class":
        members.append((f"{key}.cls", str(int(target)).encode()))
        return members, int(target)
    if kind == "vector":
        values = [float(v) for v in target]
        members.append((f"{key}.json", json.dumps(values).encode()))
        return members, values
    if target != SIDE_BY_SIDE:
        members.append((f"{key}{TARGET_TAG}{(Path(target).suffix or '.img').lower()}", _read(target, max_pixels)))
    return members, None


def _kind(source: Any) -> str:
    from fasttrain.data.formats import SIDE_BY_SIDE

    if source.class_names is not None:
        return "class"
    if source.target_names is not None:
        return "vector"
    first = source.train.targets[0] if len(source.train) else None
    if first == SIDE_BY_SIDE or isinstance(first, str):
        return "pair"
    raise ConfigError(f"pack: cannot tell what the targets of {source.root} are (class, vector or pair)")


def _pack_split(split: Any, kind: str, folder: Path, limit: int, report: PackReport, max_pixels: int) -> list[str]:
    writer = _ShardWriter(folder, split.name, limit)
    n = 0
    try:
        for path, target in zip(split.paths, split.targets):
            key = f"{n:06d}"
            try:
                members, recorded = _sample_members(key, path, target, kind, max_pixels)
            except _Unusable as e:
                report.skipped.append((e.path, e.why))
                log.warning("skipped %s: %s", *report.skipped[-1])
                continue
            writer.add(key, members, recorded)
            n += 1
    finally:
        writer.close()
    report.counts[split.name], report.shards[split.name] = n, len(writer.names)
    report.bytes += writer.bytes
    return writer.names


ORDERS = ("shuffled", "source")


def pack(
    cfg: DataConfig, out: str | os.PathLike, *, shard_bytes: int = DEFAULT_SHARD_BYTES, order: str = "shuffled"
) -> PackReport:
    """Write ``cfg.root``'s dataset as shards into the new folder ``out`` (see the module docstring); ``order``:
    the training split's, shuffled (seeded by ``data.split_seed``) or as discovered."""
    if order not in ORDERS:
        raise ValueError(f"pack --order: {order!r} is not one of {', '.join(ORDERS)}")
    from fasttrain.data.sources import discover
    from fasttrain.data.synthetic import atomic_dir

    start = time.perf_counter()
    out = Path(out).expanduser()
    if out.exists():
        raise FileExistsError(f"pack: {out} already exists; fasttrain does not overwrite it (choose a new folder)")
    source = discover(cfg)
    if source.format == "shards":
        raise ConfigError(f"pack: {cfg.root} is already shards")
    kind = _kind(source)
    report = PackReport(out.resolve(), skipped=list(source.skipped))
    manifest: dict[str, Any] = {"format": MANIFEST_FORMAT, "version": 1, "kind": kind, "splits": {}}
    manifest["classes"], manifest["target_names"] = source.class_names, source.target_names
    manifest["source"], manifest["source_format"] = str(source.root), source.format
    manifest["train_order"] = order if order == "source" else f"shuffled (seed {cfg.split_seed})"
    report.order = manifest["train_order"]
    train = source.train
    if order == "shuffled":
        rows = list(range(len(train)))
        random.Random(cfg.split_seed).shuffle(rows)
        train = train.subset(rows)
    with atomic_dir(out) as tmp:
        for split in (train, source.val, source.test):
            if split is not None and len(split):
                names = _pack_split(split, kind, tmp, shard_bytes, report, cfg.max_image_pixels)
                manifest["splits"][split.name] = {"shards": names, "count": report.counts[split.name]}
        manifest["skipped"] = [list(s) for s in report.skipped]
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    report.seconds = time.perf_counter() - start
    return report
