"""Dataset discovery shared by every backend: plain file lists and targets, never decoded images.

Each format returns a :class:`DataSource` with train / val / test :class:`Split` objects. The torch loader,
DALI and the GPU cache are all built from these lists, so every backend sees the same files with the same
labels in the same order.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import operator
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fasttrain import registry
from fasttrain.config import ConfigError, DataConfig
from fasttrain.data.files import is_shard_root, not_regular_reason

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "Split",
    "DataSource",
    "ImageScan",
    "Listed",
    "entry_kind",
    "image_named",
    "listed_once",
    "walk_folders",
    "discover",
    "find_source",
    "list_images",
    "scan_images",
    "holdout_split",
    "hold_out",
    "split_folders",
    "discover_folder",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pnm"})


@dataclass
class Split:
    name: str
    """train, val or test."""
    paths: Sequence[str]
    """Absolute image paths: a list, or from the dataset index an :class:`~fasttrain.data.index.IndexedPaths`
    (indexable, iterable and sliced like a list; one ``str`` made per access)."""
    targets: Sequence[Any]
    """Per path: an int class index (classify), a list of floats (regress) or a target image path (paired)."""

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: list[int]) -> Split:
        return Split(self.name, _take(self.paths, indices), _take(self.targets, indices))


def _take(seq: Sequence[Any], indices: Sequence[int]) -> Sequence[Any]:
    take = getattr(seq, "take", None)  # an index's view picks ids, no str made
    return take(indices) if take is not None else [seq[i] for i in indices]


@dataclass
class DataSource:
    root: Path
    format: str
    train: Split
    val: Split | None
    test: Split | None = None
    class_names: list[str] | None = None
    """Classification: index -> class folder name."""
    target_names: list[str] | None = None
    """Regression: names of the target values (e.g. x, y, r, g, b)."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(file, reason) for records found unusable during discovery (reported, not fatal)."""

    @property
    def num_outputs(self) -> int:
        if self.class_names is not None:
            return len(self.class_names)
        if self.target_names is not None:
            return len(self.target_names)
        return 0


@dataclass
class ImageScan:
    files: list[Path]
    """Regular files (or links to them) with an image extension, sorted."""
    others: list[tuple[str, str]]
    """(path, what it is) of entries with an image extension that are no regular file: FIFOs, sockets, devices,
    broken links. They are never opened (a FIFO would block the reader for ever)."""
    empty_dirs: list[Path]
    """Sub-folders (topmost ones) holding no image file at all."""


FOREIGN_IMAGE_EXTENSIONS = frozenset(
    {".gif", ".heic", ".heif", ".avif", ".jxl", ".jp2", ".j2k", ".ico", ".svg", ".psd", ".exr", ".hdr", ".tga"}
    | {".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2", ".raf"}
)
"""Image formats fasttrain does not read (animations, phones' HEIC, camera raw, vector): such files under a
dataset are named and skipped, not silently left out as other files (notes, .DS_Store) are."""


def foreign_image(name: str) -> str | None:
    """Why a file named ``name`` is an image fasttrain does not read, or None."""
    dot = name.rfind(".")
    ext = name[dot:].lower() if 0 < dot < len(name) - 1 else ""
    if ext not in FOREIGN_IMAGE_EXTENSIONS:
        return None
    return f"{ext[1:].upper()} images are not read (convert them to JPEG or PNG)"


def image_named(name: str) -> bool:
    """Whether a file name has an image extension (``Path(name).suffix.lower()`` in :data:`IMAGE_EXTENSIONS`,
    without making a Path)."""
    dot = name.rfind(".")
    return 0 < dot < len(name) - 1 and name[dot:].lower() in IMAGE_EXTENSIONS


@dataclass
class Listed:
    """One folder as one walk listed it: its visible entries, sorted by name, and what each is."""

    names: list[str]
    kinds: str
    """Per entry: "d" a folder (or a link to one), "i" a regular file (or a link to one) with an image extension,
    "f" another regular file, "o" anything else (:func:`entry_kind`'s kinds, image files told apart)."""
    whys: dict[int, str]
    """Position -> why an "o" entry is no usable file (:func:`entry_kind`'s reason)."""

    @classmethod
    def of(cls, entries: list) -> Listed:
        names = [e.name for e in entries]
        kinds: list[str] = []
        whys: dict[int, str] = {}
        exts = IMAGE_EXTENSIONS
        for i, e in enumerate(entries):
            try:  # entry_kind(), inline: once per entry of a million-file tree
                if e.is_dir():
                    kinds.append("d")
                    continue
                if e.is_file():
                    name = names[i]
                    dot = name.rfind(".")  # image_named(), inline
                    kinds.append("i" if 0 < dot < len(name) - 1 and name[dot:].lower() in exts else "f")
                    continue
            except OSError:
                pass
            kinds.append("o")
            whys[i] = entry_kind(e)[1] or "not a regular file"
        return cls(names, "".join(kinds), whys)


class _Listing(Sequence):
    """A :class:`Listed` folder's entries as :func:`walk_folders` yields them (an ``_Entry`` made per access)."""

    def __init__(self, folder: str, listed: Listed):
        self.folder, self.listed = folder, listed

    def __len__(self) -> int:
        return len(self.listed.names)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        got = self.listed
        return _Entry(self.folder, got.names[i], got.kinds[i], got.whys.get(i if i >= 0 else i + len(self)))


class _Entry:
    """A directory entry from a :class:`Listed` folder: the ``os.DirEntry`` calls discovery makes."""

    __slots__ = ("folder", "name", "kind", "why")

    def __init__(self, folder: str, name: str, kind: str, why: str | None):
        self.folder, self.name, self.kind, self.why = folder, name, kind, why

    @property
    def path(self) -> str:
        return os.path.join(self.folder, self.name)

    def is_dir(self) -> bool:
        self._raise()
        return self.kind == "d"

    def is_file(self) -> bool:
        self._raise()
        return self.kind in "if"

    def _raise(self) -> None:
        if self.why is not None and self.why.startswith("cannot be read"):  # as os.DirEntry: its stat failed
            raise OSError(self.why)

    def is_symlink(self) -> bool:  # the rest of os.DirEntry, for a registered format's discovery
        return os.path.islink(self.path)

    def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
        return os.stat(self.path, follow_symlinks=follow_symlinks)


_LISTED: contextvars.ContextVar[dict[str, Listed] | None] = contextvars.ContextVar("fasttrain_listed", default=None)


@contextlib.contextmanager
def listed_once(listed: dict[str, Listed]) -> Iterator[None]:
    """Within the block :func:`walk_folders` takes a folder's entries from ``listed`` (folder path as walked ->
    :class:`Listed`) instead of reading the folder again: the dataset index's build walks the tree once for its
    fingerprint and the format's discovery (whatever it walks) sees that same walk. Folders not there are read."""
    token = _LISTED.set(listed)
    try:
        yield
    finally:
        _LISTED.reset(token)


def entry_kind(e: os.DirEntry | _Entry) -> tuple[str, str | None]:
    """("dir" | "file" | "other", why it is no usable file): links followed; an entry whose stat fails (a link
    loop ``a.jpg -> b.jpg -> a.jpg``: ELOOP, a permission error) is "other" with the reason, never an error."""
    if isinstance(e, _Entry):
        return _KINDS[e.kind], e.why
    try:
        if e.is_dir():
            return "dir", None
        if e.is_file():  # the directory entry's type: no extra system call unless it is a link
            return "file", None
    except OSError as err:
        return "other", f"cannot be read ({err.strerror or err})"
    return "other", not_regular_reason(e.path) or "not a regular file"


_KINDS = {"d": "dir", "f": "file", "i": "file", "o": "other"}

_PROGRESS = [0]


def note_progress() -> None:
    """A step of the work that lists and checks a dataset (a folder listed, a file stat'ed, a header checked, a
    manifest row or a drawing step read) is done: every loop over files of a built-in format's discovery and of
    the dataset index calls it. Under torchrun, rank 0 indexes the data while the other ranks wait: they wait as
    long as this moves on (see :func:`fasttrain.distributed.decide`), so a rank 0 frozen in one blocking call (a
    hung network mount) ends their wait after dist.timeout_s, as a dead one does. Threads may call it (a lost
    increment changes nothing). About 70 ns a call (66 ns measured with timeit)."""
    _PROGRESS[0] += 1


def progress() -> int:
    """How many steps :func:`note_progress` has counted in this process."""
    return _PROGRESS[0]


def walk_folders(
    folder: Path, *, skip: Callable[[Path, str], bool] | None = None, warn: bool = True
) -> Iterator[tuple[Path, list]]:
    """``(folder, its entries sorted by name)`` for ``folder`` and every sub-folder under it, depth first, hidden
    ones skipped and ``skip(parent, name)`` ones too. Linked folders are followed once, by resolved identity
    (device, inode), and a link to a folder that holds ``folder`` (``up -> ..``: a loop) not at all, so
    discovery ends and lists each file once, under the folder it really lies in. A folder that cannot be listed
    is logged and left out (``warn=False``: left out quietly, for a walk that repeats discovery's). Inside
    :func:`listed_once`, a folder listed there is not read again (its entries are :class:`Listed` ones)."""
    seen: set[tuple[int, int]] = set()
    top = os.path.realpath(folder)
    listed = _LISTED.get()

    def walk(d: Path) -> Iterator[tuple[Path, list]]:
        try:
            st = d.stat()
            if (st.st_dev, st.st_ino) in seen:
                return
            real = os.path.realpath(d)
            if d != Path(folder) and (real == top or Path(top).is_relative_to(real)):
                if warn:
                    log.warning("not following %s: it links to %s, which holds %s (a link loop)", d, real, folder)
                return
            seen.add((st.st_dev, st.st_ino))
            known = listed.get(str(d)) if listed is not None else None
            if known is not None:
                entries: Sequence = _Listing(str(d), known)
                dirs = [n for n, k in zip(known.names, known.kinds) if k == "d"]
            else:
                with os.scandir(d) as it:
                    entries = [e for e in it if e.name[:1] != "."]
                note_progress()  # per folder: a readdir returns hundreds of names a call (the stats are per file)
                entries.sort(key=_name)
                dirs = [e.name for e in entries if entry_kind(e)[0] == "dir"]
        except OSError as err:
            if warn:
                log.warning("cannot list %s: %s", d, err.strerror or err)
            return
        yield d, entries  # type: ignore[misc]
        for name in dirs:
            if not (skip and skip(d, name)):
                yield from walk(Path(os.path.join(d, name)))

    yield from walk(Path(folder))


_name = operator.attrgetter("name")


def scan_images(folder: Path) -> ImageScan:
    """Image files under ``folder`` (recursively, sorted, hidden files and folders skipped; linked folders followed
    once, see :func:`walk_folders`), and the image-named entries that are not regular files. An entry that cannot
    even be stat'ed (a file link loop, ELOOP) is one of those, whatever its name: named, skipped, counted."""
    files, others, found, walked = _scan(folder)
    # A folder is empty when no folder at or under it (by path, as walked) holds an image; report the topmost
    # ones only (an empty class folder, not each of its empty sub-folders).
    root = Path(folder)
    found_paths = {Path(d) for d in found}
    empty = [d for d in walked if d != root and not any(f == d or f.is_relative_to(d) for f in found_paths)]
    empty = sorted(d for d in empty if not any(o != d and d.is_relative_to(o) for o in empty))
    return ImageScan([Path(f) for f in files], others, empty)


def _scan(folder: Path) -> tuple[list[str], list[tuple[str, str]], set[str], list[Path]]:
    """:func:`scan_images`' walk: (image files as str, the others, folders holding an image, folders walked)."""
    files: list[str] = []
    others: list[tuple[str, str]] = []
    found: set[str] = set()  # folders holding an image file directly
    walked: list[Path] = []
    for d, entries in walk_folders(folder):
        walked.append(d)
        base = os.path.join(d, "")
        if isinstance(entries, _Listing):  # from one walk's record: the kinds are known, image files marked
            got = entries.listed
            n = len(files)
            files.extend([base + name for name, k in zip(got.names, got.kinds) if k == "i"])
            if len(files) > n:
                found.add(str(d))
            for i in got.whys:
                if image_named(got.names[i]) or got.whys[i].startswith("cannot be read"):
                    others.append((base + got.names[i], got.whys[i]))
            if "f" in got.kinds:
                for name, k in zip(got.names, got.kinds):
                    why = foreign_image(name) if k == "f" else None
                    if why:
                        others.append((base + name, why))
            continue
        for e in entries:
            kind, why = entry_kind(e)
            if kind == "dir":
                continue
            if kind == "file":
                if image_named(e.name):
                    files.append(base + e.name)
                    found.add(str(d))
                elif foreign := foreign_image(e.name):
                    others.append((base + e.name, foreign))
            elif image_named(e.name) or why and why.startswith("cannot be read"):
                others.append((base + e.name, why or "not a regular file"))
    return files, others, found, walked


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (see :func:`scan_images`); image-named entries that are not regular files
    (a FIFO called ``x.png``) and images of formats fasttrain does not read are left out with a warning."""
    scan = scan_images(folder)
    for path, why in scan.others[:20]:
        log.warning("skipped %s: %s", path, why)
    if len(scan.others) > 20:
        log.warning("skipped %d more files under %s", len(scan.others) - 20, folder)
    return scan.files


def holdout_split(targets: Sequence[Any], fraction: float, seed: int, stratify: bool) -> tuple[list[int], list[int]]:
    """Seeded (train, val) index lists. Stratified by class when asked: each class gives its share."""
    if fraction <= 0:
        return list(range(len(targets))), []
    rng = random.Random(seed)
    groups: dict[Any, list[int]] = {}
    for i, t in enumerate(targets):
        groups.setdefault(t if stratify else 0, []).append(i)
    train, val = [], []
    for key in sorted(groups, key=str):
        idx = groups[key]
        rng.shuffle(idx)
        n_val = int(round(len(idx) * fraction))
        if n_val == 0 and len(idx) >= 2:
            n_val = 1
        val.extend(idx[:n_val])
        train.extend(idx[n_val:])
    return sorted(train), sorted(val)


def split_folders(cfg: DataConfig, root: Path) -> tuple[dict[str, Path], set[str]]:
    """The split folders that exist ({"train": ..., "val"?: ..., "test"?: ...}; the root itself is the training
    split when it has no train_dir), and the names that are splits, not data, when the root is that split. A
    folder is one split only: ``val_dir = "test"`` (CIFAR-10's layout) validates on test/ and leaves no test split
    (the same images were evaluated, decoded and cached again after training)."""
    dirs = {"train": root / cfg.train_dir, "val": root / cfg.val_dir, "test": root / cfg.test_dir}
    train = dirs["train"] if dirs["train"].is_dir() and dirs["train"] != root else root
    found = {"train": train}
    for name in ("val", "test"):
        if dirs[name].is_dir() and dirs[name] not in (root, *found.values()):
            found[name] = dirs[name]
    reserved = {cfg.train_dir, cfg.val_dir, cfg.test_dir} if train == root else set()
    return found, reserved


def hold_out(train: Split, cfg: DataConfig, *, stratify: bool, groups: list[Any] | None = None) -> tuple[Split, Split]:
    """(train, val): a seeded ``cfg.val_fraction`` of ``train`` held out, per class when ``stratify``; with
    ``groups``, whole groups go to one side (steps of one drawing session)."""
    if groups is None:
        tr, va = holdout_split(train.targets, cfg.val_fraction, cfg.split_seed, stratify=stratify)
    else:
        keys = sorted(set(groups), key=str)
        _, gva = holdout_split(keys, cfg.val_fraction, cfg.split_seed, stratify=False)
        val_keys = {keys[i] for i in gva}
        va = [i for i, g in enumerate(groups) if g in val_keys]
        tr = [i for i, g in enumerate(groups) if g not in val_keys]
    train_part, val = train.subset(tr), train.subset(va)
    val.name = "val"
    log.info(
        "no %s/ split: held out %d of %d training samples for validation (data.val_fraction %.2f, seed %d)",
        cfg.val_dir,
        len(va),
        len(tr) + len(va),
        cfg.val_fraction,
        cfg.split_seed,
    )
    return train_part, val


def _class_dir(p: Path, split: Path) -> bool:
    """A class folder of ``split``: a visible folder, but no link to a folder holding the split (``up -> ..``:
    a loop that would make every image a sample of class "up")."""
    if p.name.startswith(".") or not p.is_dir():
        return False
    if p.is_symlink() and Path(os.path.realpath(split)).is_relative_to(os.path.realpath(p)):
        log.warning("not a class folder: %s links to %s, which holds it (a link loop)", p, os.path.realpath(p))
        return False
    return True


def _class_folder_split(
    folder: Path,
    name: str,
    class_names: list[str],
    skipped: list[tuple[str, str]] | None = None,
    reserved: set[str] | frozenset[str] = frozenset(),
) -> Split:
    """The split's files and class indices; image-named entries that are no regular file go to ``skipped``.
    ``reserved``: the other splits' folders, where the root is the training split (val/ beside cat/ and fish/)."""
    paths, targets = [], []
    index = {c: i for i, c in enumerate(class_names)}
    for sub in sorted(p for p in folder.iterdir() if _class_dir(p, folder) and p.name not in reserved):
        if sub.name not in index:
            raise ConfigError(
                f"data.root: {name} split {folder} has class folder {sub.name!r} that the training "
                f"split lacks (training classes: {', '.join(class_names)})"
            )
        files, others, _, _ = _scan(sub)
        paths.extend(files)
        targets.extend([index[sub.name]] * len(files))
        if skipped is not None:
            skipped.extend(others)
    return Split(name, paths, targets)


def discover_folder(cfg: DataConfig, root: Path) -> DataSource:
    """The ``folder`` format: one sub-folder per class (ImageFolder), under split folders or a hold-out."""
    folders, reserved = split_folders(cfg, root)
    train_dir = folders["train"]
    entries = sorted(train_dir.iterdir())
    class_names = sorted(p.name for p in entries if _class_dir(p, train_dir) and p.name not in reserved)
    if not class_names:
        loose = sum(p.suffix.lower() in IMAGE_EXTENSIONS for p in entries)
        here = (
            f"; its {loose} images lie in it directly: if it is one class's folder, data.root is the folder above "
            f"({train_dir.parent})"
            if loose
            else ""
        )
        raise ConfigError(f"data.root: {train_dir} holds no class folders (expected {train_dir}/<class>/<image>){here}")
    _refuse_a_split_as_a_class(train_dir, class_names)
    skipped: list[tuple[str, str]] = []
    train = _class_folder_split(train_dir, "train", class_names, skipped, reserved)
    if len(train) == 0:
        raise ConfigError(f"data.root: no images under {train_dir} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    present = set(train.targets)
    empty = [c for i, c in enumerate(class_names) if i not in present]
    if empty and len(present) < 2 <= len(class_names):
        raise ConfigError(_one_class_with_images(train_dir, class_names[min(present)], empty, skipped))
    if empty:
        log.warning("class folders without images fasttrain reads in %s: %s", train_dir, ", ".join(empty))
    _warn_of_layout(root, train_dir, entries, class_names, cfg, has_val="val" in folders)
    if "val" in folders:
        val = _class_folder_split(folders["val"], "val", class_names, skipped)
    else:
        train, val = hold_out(train, cfg, stratify=True)
    test = _class_folder_split(folders["test"], "test", class_names, skipped) if "test" in folders else None
    return DataSource(root, "folder", train, val if len(val) else None, test, class_names=class_names, skipped=skipped)


VAL_LOOKALIKES = ("validation", "valid", "validate", "dev", "eval")
"""Folder names other datasets give the validation split (Keras, Kaggle): named in a warning, never taken."""


def _refuse_a_split_as_a_class(train_dir: Path, class_names: list[str]) -> None:
    """A class folder named like a validation split (validation/, valid/, ...) that holds folders named like the
    other classes is that split, not a class: it trained as a third class, cat, fish and validation."""
    for name in (n for n in class_names if n.lower() in VAL_LOOKALIKES):
        inside = {p.name for p in (train_dir / name).iterdir() if p.is_dir()}
        alike = sorted(inside & (set(class_names) - {name}))
        if alike:
            raise ConfigError(
                f"data.root: {train_dir / name} holds folders named like the classes ({', '.join(alike)}): a "
                f"validation split, not a class; --set data.val_dir={name} validates on it"
            )


def _one_class_with_images(train_dir: Path, only: str, empty: list[str], skipped: list[tuple[str, str]]) -> str:
    """The refusal of a training split where one class folder alone holds images (the others' files are all of
    formats fasttrain does not read, or none): it trained, and validated at 100% on that one class."""
    why = ""
    for name in empty:
        inside = [(f, r) for f, r in skipped if Path(f).is_relative_to(train_dir / name)]
        if inside:
            files = f"{len(inside)} file{'s' if len(inside) > 1 else ''}"
            why = f"; {files} skipped in {name}/, the first {inside[0][0]}: {inside[0][1]}"
            break
    return (
        f"data.root: of the class folders in {train_dir}, only {only}/ holds images it can read ({', '.join(empty)}: "
        f"none{why}); a classifier needs images of two classes at least"
    )


def _warn_of_layout(
    root: Path, train_dir: Path, entries: list[Path], class_names: list[str], cfg: DataConfig, *, has_val: bool
) -> None:
    """What a folder dataset's layout leaves out or takes otherwise than its owner may think, in warnings: images
    beside the class folders (in no class), class folders whose names differ only in case (two classes), and a
    validation split under another name than data.val_dir."""
    loose = [p.name for p in entries if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    if loose:
        log.warning(
            "%d image%s directly in %s, in no class folder, %s not used (%s%s)",
            len(loose),
            "s" if len(loose) > 1 else "",
            train_dir,
            "are" if len(loose) > 1 else "is",
            ", ".join(loose[:3]),
            ", ..." if len(loose) > 3 else "",
        )
    by_case: dict[str, list[str]] = {}
    for name in class_names:
        by_case.setdefault(name.casefold(), []).append(name)
    alike = [" and ".join(names) for names in by_case.values() if len(names) > 1]
    if alike:
        log.warning(
            "class folders %s in %s differ only in case: each is a class of its own (merge them, or rename one)",
            "; ".join(alike),
            train_dir,
        )
    if not has_val and train_dir != root:
        other = next((n for n in VAL_LOOKALIKES if n not in (cfg.val_dir, cfg.test_dir) and (root / n).is_dir()), None)
        if other is not None:
            log.warning(
                "%s looks like a validation split, but data.val_dir is %r: --set data.val_dir=%s validates on it "
                "(now %.0f%% of the training images are held out instead)",
                root / other,
                cfg.val_dir,
                other,
                100 * cfg.val_fraction,
            )


def not_a_folder(root: Path) -> ConfigError:
    what = "does not exist" if not root.exists() and not root.is_symlink() else "is not a folder"
    return ConfigError(f"data.root: {root} {what}; --set data.root=FOLDER names your data (a config's is a default)")


def find_source(cfg: DataConfig, root: str | os.PathLike | None = None) -> DataSource:
    """:func:`discover` without logging what it skipped (the dataset index logs it once, built or reused)."""
    given = root if root is not None else cfg.root
    fmt = "shards" if is_shard_root(cfg.format, given) else cfg.format  # a .tar, brace pattern, URL or packed folder
    root = Path(given).expanduser()
    if fmt != "shards" and not root.is_dir():
        raise not_a_folder(root)
    try:
        find = registry.resolve("formats", fmt)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    src = find(cfg, given if fmt == "shards" else root)  # shards: the root as given (a URL is no Path)
    if cfg.max_samples and len(src.train) > cfg.max_samples:
        rng = random.Random(cfg.split_seed)
        keep = sorted(rng.sample(range(len(src.train)), cfg.max_samples))
        src.train = src.train.subset(keep)
    return src


def discover(cfg: DataConfig, root: str | os.PathLike | None = None) -> DataSource:
    """Find the dataset's files for ``cfg.format`` under ``root`` (default ``cfg.root``), with the format's
    discovery function from the ``formats`` table of :mod:`fasttrain.registry`. Every call lists the files
    anew; :func:`fasttrain.data.index.indexed_source` gives the same source from the dataset index."""
    src = find_source(cfg, root)
    for f, why in src.skipped:
        log.warning("skipped %s: %s", f, why)
    return src
