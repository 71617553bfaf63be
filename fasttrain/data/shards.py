"""Tar shards (WebDataset layout): reading a member by its address, and finding a shard dataset's samples.

A **member address** is the shard's path, ``:`` and the member's name: ``/data/c10/train-000003.tar:000123.jpg``.
It stands wherever a file path does (``Split.paths``, ``Split.targets`` of pairs, bad-file lists), so every
backend reads members through :func:`fasttrain.data.files.open_regular` as it reads files, with no change of
its own: the torch loader's PIL decode, the GPU cache's one-read check and decode, DALI's ``external_source``
feeder and the pre-check all get the member's bytes from one ``pread`` at the offset the shard's index gives.
The order of an epoch stays :class:`~fasttrain.data.order.EpochSampler`'s pure function of (seed, epoch), so
a resumed run replays the same batches, as from files. A bad member is named by its address and skipped like a
bad file.

**Layout** (what ``fasttrain pack`` writes, :mod:`fasttrain.data.pack`): a sample's members share a key
(``000123.jpg`` + ``000123.cls``): the image (its original bytes and extension), ``.cls`` (class index as
text), ``.json`` (a list of floats: regression targets) or ``.target.<ext>`` (a pair's target image; a
side-by-side pair has none). Beside each shard ``<shard>.tar.idx`` (JSON: every member's name, data offset and
size, and the samples' targets, so discovery reads no member), and in the folder ``shards.json`` (the
manifest: sample kind, classes or target names, splits with their shards and counts).

**Roots** ``data.root`` may name: a folder holding ``shards.json`` or ``.tar`` files, one ``.tar``, a brace
pattern (``train-{000000..000009}.tar``), or URLs of any of these (``http(s)://``; an object store's, ``s3://``
and the like, through fsspec, an optional extra). Shards without an index (WebDataset's own) are indexed by
reading their tar headers once. Remote shards with an index are **streamed** when ``data.stream`` allows
(``auto``, ``on``): discovery fetches only the manifest and the indexes, the split's paths stay member addresses
of the URLs, and the torch loader reads each shard in one pass (:mod:`fasttrain.data.stream`). Otherwise (or for a
reader that needs members by offset: the GPU cache, DALI) a remote shard is downloaded whole, in one sequential
read, into ``$FASTTRAIN_CACHE/shards`` (a temporary file renamed into place, so processes sharing the cache never
see half a shard), and then read by offset like a local one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fasttrain.config import ConfigError, DataConfig
from fasttrain.data.files import (
    BRACE,
    INDEX_SUFFIX,
    MANIFEST,
    URL,
    ShardIndex,
    address,
    load_index,
    open_member,
    parse_index,
    set_remote_reader,
)
from fasttrain.data.sources import IMAGE_EXTENSIONS, DataSource, Split, hold_out
from fasttrain.io import atomic_replace

log = logging.getLogger(__name__)

__all__ = ["MANIFEST_FORMAT", "TARGET_TAG", "discover_shards", "expand_braces", "is_url", "open_url"]

MANIFEST_FORMAT = "fasttrain-shards"
SPLITS = ("train", "val", "test")
TARGET_TAG = ".target"
"""A pair's target image is ``<key>.target.<ext>``."""


# -- roots: folders, patterns, URLs -------------------------------------------------------------------------------


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> ``a-000.tar a-001.tar a-002.tar`` (zero padding kept; several ranges multiply)."""
    m = BRACE.search(pattern)
    if m is None:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    if int(hi) < int(lo):
        raise ConfigError(f"data.root: the range {{{lo}..{hi}}} in {pattern} counts down")
    width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
    out: list[str] = []
    for n in range(int(lo), int(hi) + 1):
        out += expand_braces(pattern[: m.start()] + str(n).zfill(width) + pattern[m.end() :])
    return out


def is_url(root: str) -> bool:
    return bool(URL.match(root))


def _cache_dir() -> Path:
    from fasttrain.data.synthetic import default_cache_dir

    return default_cache_dir() / "shards"


def open_url(url: str) -> Any:
    """A binary stream of ``url``: urllib for http(s), fsspec (the optional extra ``fasttrain[shards]``, with the
    store's own package: s3fs, gcsfs, adlfs) for any other scheme; a local path (a shard downloaded beside
    streamed ones) is opened as a file."""
    if not is_url(url):
        return open(url, "rb")
    if url.lower().startswith(("http://", "https://")):
        return urllib.request.urlopen(url, timeout=60)
    try:
        import fsspec
    except ImportError:
        raise ConfigError(
            f"data.root: {url}: reading {url.split('://')[0]}:// needs fsspec and the store's package "
            f"(pip install 'fasttrain[shards]' s3fs, or gcsfs, adlfs)"
        ) from None
    try:
        return fsspec.open(url, "rb").open()
    except (ImportError, ValueError) as e:  # the store's package is missing, or an unknown protocol
        raise ConfigError(f"data.root: {url}: {e}") from None


def _fetch(url: str, what: str) -> bytes:
    try:
        with open_url(url) as r:
            return r.read()
    except OSError as e:  # URLError and HTTPError are OSErrors, as are fsspec's FileNotFoundError
        raise ConfigError(f"data.root: cannot fetch {what} {url} ({e})") from None


def _download(url: str, size: int | None) -> str:
    """The local copy of the shard at ``url``, downloaded whole (one sequential read) when it is missing or its
    size differs from ``size``. One process downloads while the others sharing the cache wait on its lock (ranks
    of a node fetch each shard once); the copy is written to a temporary file and renamed, so no process ever
    reads half a shard."""
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    name = urllib.parse.unquote(url.rsplit("/", 1)[-1]) or "shard.tar"
    local = _cache_dir() / key / name

    def ready() -> bool:
        return local.is_file() and (size is None or local.stat().st_size == size)

    if ready():
        return str(local)
    try:
        local.parent.mkdir(parents=True, exist_ok=True)
        with open(local.parent / f".{name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
            if not ready():
                _download_into(url, local, size)
    except OSError as e:
        raise ConfigError(f"data.root: cannot download shard {url} into {local.parent} ({e})") from None
    return str(local)


def _download_into(url: str, local: Path, size: int | None) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{local.name}.", suffix=".tmp", dir=local.parent)
    try:
        with os.fdopen(fd, "wb") as out, open_url(url) as r:
            shutil.copyfileobj(r, out, 1 << 20)
        got = os.path.getsize(tmp)
        if size is not None and got != size:
            raise ConfigError(f"data.root: {url} is {got} bytes, its index says {size}")
        os.replace(tmp, local)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("downloaded shard %s -> %s", url, local)


def _remote_index(url: str) -> tuple[ShardIndex | None, bytes | None]:
    """(the index beside the remote shard ``url``, its JSON); (None, None) when there is none."""
    try:
        raw = _fetch(url + INDEX_SUFFIX, "shard index")
    except ConfigError:
        return None, None  # no index beside it: the tar headers are read once it is here
    try:
        return parse_index(raw, url + INDEX_SUFFIX), raw
    except ValueError as e:
        raise ConfigError(f"data.root: {e}") from None


def _shard_to_read(shard: str, stream: str) -> str:
    """What discovery reads a shard as: a URL left remote when ``data.stream`` lets it stream (its index fetched
    and kept under the URL, nothing downloaded), else a local path (:func:`_local_shard`)."""
    if not is_url(shard) or stream == "off":
        return _local_shard(shard)
    idx, _ = _remote_index(shard)
    if idx is None:
        if stream == "on":
            raise ConfigError(
                f"data.stream = on, but shard {shard} has no index ({shard}{INDEX_SUFFIX}), which streaming needs "
                f"for its sample counts and targets (fasttrain pack writes one beside each shard); set "
                f"data.stream = auto or off to download it whole"
            )
        return _local_shard(shard)
    load_index(shard, idx)
    return shard


_LOCAL: dict[str, str] = {}


def _download_for_reader(url: str) -> str:
    """A streamed shard's local copy, for a reader that needs its members by offset (the GPU cache, DALI): the
    shard downloaded whole, once per process (see :func:`fasttrain.data.files.set_remote_reader`)."""
    local = _LOCAL.get(url)
    if local is None:
        local = _LOCAL[url] = _local_shard(url)
    return local


set_remote_reader(_download_for_reader)


def _local_shard(shard: str) -> str:
    """A shard given locally or by URL -> a local path whose index is loaded (URL: its index fetched, the shard
    downloaded into the cache)."""
    idx: ShardIndex | None = None
    if is_url(shard):
        idx, raw = _remote_index(shard)
        shard = _download(shard, idx.size if idx else None)
        if raw is not None:  # beside the copy, for processes that start afresh (spawned workers)
            data = raw

            def write(p: Path) -> None:
                p.write_bytes(data)

            atomic_replace(shard + INDEX_SUFFIX, write)
    elif not os.path.isfile(shard):
        raise ConfigError(f"data.root: shard {shard} not found")
    try:
        load_index(shard, idx)
    except (ValueError, OSError) as e:
        raise ConfigError(f"data.root: {e}") from None
    return shard


def _pattern(root: str) -> bool:
    """A root naming shards themselves (one ``.tar`` or a brace pattern), not their folder."""
    return root.endswith(".tar") or bool(BRACE.search(root))


def _manifest_json(raw: bytes | str, where: str) -> dict[str, Any]:
    try:
        manifest = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"data.root: manifest {where} is damaged ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ConfigError(f"data.root: {where} is not a {MANIFEST_FORMAT} manifest")
    return manifest


def _read_manifest(root: str) -> tuple[dict[str, Any] | None, str]:
    """(the manifest of the shards' folder or None, that folder or URL base). A pattern or single shard in a
    packed folder takes its kind and classes from the folder's manifest (its splits are the pattern's)."""
    if is_url(root):
        if root.endswith(".json"):
            return _manifest_json(_fetch(root, "manifest"), root), root.rsplit("/", 1)[0] + "/"
        base = root.rsplit("/", 1)[0] + "/" if _pattern(root) else root.rstrip("/") + "/"
        try:
            return _manifest_json(_fetch(base + MANIFEST, "manifest"), base + MANIFEST), base
        except ConfigError:
            if _pattern(root):
                return None, base
            raise ConfigError(
                f"data.root: {base + MANIFEST} cannot be fetched; a URL root names shards.json's folder, one "
                f".tar or a brace pattern (train-{{000000..000009}}.tar)"
            ) from None
    p = Path(root).expanduser()
    folder = p.parent if _pattern(root) else p
    m = folder / MANIFEST
    if m.is_file():
        return _manifest_json(m.read_bytes(), str(m)), str(folder.resolve())
    return None, str(folder.resolve())


def _split_shards(root: str, manifest: dict[str, Any] | None, base: str) -> dict[str, list[str]]:
    """Split name -> its shards (paths or URLs): a pattern's or a file's (train), else the manifest's, else
    a folder's ``.tar`` files (``val*`` and ``test*`` ones are those splits, the rest train)."""
    if _pattern(root):
        return {"train": expand_braces(root if is_url(root) else str(Path(root).expanduser().resolve()))}
    join = (lambda n: base + n) if is_url(base) else (lambda n: str(Path(base) / n))
    if manifest is not None:
        return {s: [join(n) for n in v["shards"]] for s, v in manifest.get("splits", {}).items() if v.get("shards")}
    folder = Path(root).expanduser().resolve()
    out: dict[str, list[str]] = {}
    for f in sorted(folder.glob("*.tar")):
        split = next((s for s in ("val", "test") if f.name.startswith(s)), "train")
        out.setdefault(split, []).append(str(f))
    return out


# -- samples ------------------------------------------------------------------------------------------------------


def _key_ext(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the name up to the first dot of its last path part; the rest the type."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _samples(idx: ShardIndex) -> Iterator[tuple[str, dict[str, str]]]:
    """(key, {type: member name}) in the shard's order."""
    groups: dict[str, dict[str, str]] = {}
    for name in idx.members:
        key, ext = _key_ext(name)
        groups.setdefault(key, {})[ext] = name
    yield from groups.items()


def _member_target(shard: str, member: str) -> Any:
    f = open_member(address(shard, member))
    assert f is not None
    text = f.read().decode("utf-8").strip()
    return int(text) if member.endswith(".cls") else json.loads(text)


def _sample(shard: str, idx: ShardIndex, key: str, parts: dict[str, str], kind: str) -> tuple[str, Any]:
    """(image address, target) of one sample; ValueError saying what is wrong with it."""
    images = {e: n for e, n in parts.items() if "." + e.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS}
    inputs = [n for e, n in images.items() if not e.startswith(TARGET_TAG[1:] + ".")]
    if len(inputs) != 1:
        raise ValueError(f"{len(inputs)} input images (want one of {', '.join(sorted(IMAGE_EXTENSIONS))})")
    image = address(shard, inputs[0])
    if kind == "pair":
        from fasttrain.data.formats import SIDE_BY_SIDE  # imports torch: only for pairs

        targets = [n for e, n in images.items() if e.startswith(TARGET_TAG[1:] + ".")]
        return image, address(shard, targets[0]) if targets else SIDE_BY_SIDE
    if key in idx.targets:
        return image, idx.targets[key]
    label = parts.get("cls") if kind == "class" else parts.get("json")
    if label is None:
        raise ValueError(f"no .{'cls' if kind == 'class' else 'json'} member")
    try:
        return image, _member_target(shard, label)
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise ValueError(f"unreadable target {label} ({e})") from None


def _check_target(target: Any, kind: str, width: int | None) -> str | None:
    """Why a recorded target is unusable (``width``: the class count or the vector length, when known)."""
    if kind == "class":
        if not isinstance(target, int) or target < 0 or (width is not None and target >= width):
            return f"class {target!r} is not an index of the {width or 'known'} classes"
    if kind == "vector":
        ok = isinstance(target, list) and all(isinstance(v, (int, float)) for v in target)
        if not ok or (width is not None and len(target) != width):
            return f"targets {target!r} are not {width or 'a list of'} numbers"
    return None


def _read_split(
    name: str, shards: list[str], kind: str, width: int | None, skipped: list[tuple[str, str]], stream: str = "off"
) -> Split:
    """The samples of one split's shards, in shard order; unusable ones go to ``skipped``, named ``shard:key``.
    ``stream``: ``data.stream`` (remote shards with an index stay URLs: their samples are streamed)."""
    paths: list[str] = []
    targets: list[Any] = []
    for given in shards:
        shard = _shard_to_read(given, stream)
        idx = load_index(shard)
        for key, parts in _samples(idx):
            try:
                path, target = _sample(shard, idx, key, parts, kind)
            except ValueError as e:
                skipped.append((address(shard, key), str(e)))
                continue
            why = _check_target(target, kind, width)
            if why is not None:
                skipped.append((address(shard, key), why))
                continue
            paths.append(path)
            targets.append([float(v) for v in target] if kind == "vector" else target)
    return Split(name, paths, targets)


def discover_shards(cfg: DataConfig, root: str | os.PathLike) -> DataSource:
    """The ``shards`` format: a :class:`~fasttrain.data.sources.DataSource` whose paths are member addresses.
    Splits come from the manifest or the shard names (``val*``, ``test*``); without a val split a seeded
    ``data.val_fraction`` is held out, as for files."""
    text = os.fspath(root)
    manifest, base = _read_manifest(text)
    by_split = _split_shards(text, manifest, base)
    if not by_split.get("train"):
        raise ConfigError(f"data.root: no training shards in {text} (a folder of .tar, a pattern, or {MANIFEST})")
    kind = (manifest or {}).get("kind", "class")
    names, classes = (manifest or {}).get("target_names"), (manifest or {}).get("classes")
    width = len(classes) if kind == "class" and classes else len(names) if kind == "vector" and names else None
    skipped: list[tuple[str, str]] = []
    splits = {s: _read_split(s, by_split[s], kind, width, skipped, cfg.stream) for s in SPLITS if by_split.get(s)}
    train = splits["train"]
    if not len(train):
        first = f"; first: {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        raise ConfigError(f"data.root: no usable samples in the training shards of {text}{first}")
    val = splits.get("val")
    if val is None:
        train, val = hold_out(train, cfg, stratify=kind == "class")
    if kind == "class" and not classes:
        classes = [str(i) for i in range(max(train.targets) + 1)]
    if kind == "vector" and not names:
        names = [f"t{i}" for i in range(len(train.targets[0]))]
    test = splits.get("test")
    return DataSource(
        Path(base) if not is_url(base) else Path(text),
        "shards",
        train,
        val if len(val) else None,
        test if test is not None and len(test) else None,
        class_names=classes if kind == "class" else None,
        target_names=names if kind == "vector" else None,
        skipped=skipped,
    )
