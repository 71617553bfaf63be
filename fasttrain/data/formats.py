"""Discovery of the non-folder formats: manifests (image -> numbers), drawing sessions, paired images.

Like ``sources.discover_folder`` these return plain file lists and targets, never decoded images (drawing
reads each canvas's header for its size). Unusable records are reported in ``DataSource.skipped`` as
``(file, reason)`` and left out; only a mistake in the layout itself (no manifest, a path escaping the root,
no images at all) raises :class:`~fasttrain.config.ConfigError`.

Formats
- manifest: ``root/<data.manifest>``, a CSV with a header (separated by commas, or by semicolons, tabs or bars;
  with a semicolon, ``0,5`` is a number) or a ``.jsonl`` file (one object per line). The
  image column is the first of :data:`PATH_COLUMNS` (``path``, ``image``, ``file``, ``filename``, ...); its paths
  are relative to the root (absolute paths must lie inside it). A column named ``label``, ``class`` or
  ``category`` makes it a classifier's: the classes are that column's values (sorted, by value when all are
  numbers), unless they are numbers with fractions (a regression target named so). Else the targets are
  ``data.target_columns``, or every other column whose values are mostly numbers (the columns left out are named
  in a warning).
  An optional ``split`` column (train / val / test) assigns rows; without it (or without val rows) a seeded
  ``data.val_fraction`` of the training rows is held out.
- drawing: session folders of steps. ``step_0000.png`` is the canvas before a stroke and ``step_0001.json``
  holds that stroke's first point and colour, ``{"x": 12, "y": 30, "color": "#ff4444"}``; canvas N pairs with
  JSON N + 1. Targets are ``[x / W, y / H, r, g, b]`` (W, H: the canvas size in pixels; colour on 0..1).
  Sessions live under ``train/``, ``val/``, ``test/`` or directly under the root, in which case whole sessions
  are held out (steps of one session are too alike to sit on both sides of a split).
- paired: ``A/`` and ``B/`` folders whose files match by relative path (extension aside), or side-by-side
  images with the input on the left half and the target on the right (pix2pix's ``AB`` layout), whose target
  is :data:`SIDE_BY_SIDE`. Splits are ``train/``, ``val/``, ``test/`` sub-folders (``train/A`` or ``A/train``)
  or a seeded hold-out.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image

from fasttrain.config import ConfigError, DataConfig
from fasttrain.data.decode import DECODE_ERRORS
from fasttrain.data.sources import (
    IMAGE_EXTENSIONS,
    DataSource,
    Split,
    entry_kind,
    hold_out,
    list_images,
    note_progress,
    split_folders,
    walk_folders,
)

log = logging.getLogger(__name__)

__all__ = [
    "LABEL_COLUMNS",
    "discover_manifest",
    "discover_drawing",
    "discover_paired",
    "SIDE_BY_SIDE",
    "DRAWING_TARGETS",
    "PATH_COLUMNS",
    "parse_color",
]

SIDE_BY_SIDE = ":right-half:"
"""Paired target marker: the target is the right half of the input file (the input is its left half)."""
DRAWING_TARGETS = ["x", "y", "r", "g", "b"]
"""Target layout of the drawing format: point as a share of the canvas size, colour on 0..1."""
PATH_COLUMNS = ("path", "image", "file", "filename", "file_name", "image_path", "filepath", "image_name", "img")
"""Manifest columns that may hold the image path, in order of preference."""
SPLIT_NAMES = ("train", "val", "test")
LABEL_COLUMNS = ("label", "class", "category")
"""A manifest column of class names: the manifest is a classifier's (its classes are the column's values)."""

_STEP = re.compile(r"^step_(\d+)\.(\w+)$")
_COLOR = re.compile(r"^#([0-9a-fA-F]{6}|[0-9a-fA-F]{3})$")


def _finish(
    root: Path,
    fmt: str,
    splits: dict[str, Split],
    cfg: DataConfig,
    skipped: list[tuple[str, str]],
    groups: list[Any] | None = None,
    **names: Any,
) -> DataSource:
    stratify = names.get("class_names") is not None  # classes: each held out in its share
    train = splits.get("train")
    if train is None or len(train) == 0:
        detail = f"; {len(skipped)} records skipped, first: {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        raise ConfigError(f"data.root: no usable {fmt} training samples under {root}{detail}")
    val = splits.get("val")
    if val is None:
        train, val = hold_out(train, cfg, stratify=stratify, groups=groups)
    test = splits.get("test")
    return DataSource(
        root,
        fmt,
        train,
        val if val is not None and len(val) else None,
        test if test is not None and len(test) else None,
        skipped=skipped,
        **names,
    )


# -- manifest ------------------------------------------------------------------------------------------------
def _read_manifest(path: Path, skipped: list[tuple[str, str]]) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) pairs; malformed JSON lines are skipped with their line number. A file that is not
    UTF-8 is an error naming it; a byte-order mark (Excel's "CSV UTF-8") is accepted."""
    try:
        return _read_manifest_rows(path, skipped)
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"data.manifest: {path} is not UTF-8 text (byte {e.start} cannot be decoded); save it "
            f"as UTF-8 (in Excel: CSV UTF-8)"
        ) from None


def _read_manifest_rows(path: Path, skipped: list[tuple[str, str]]) -> list[tuple[int, dict[str, Any]]]:
    rows: list[tuple[int, dict[str, Any]]] = []
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8-sig") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    skipped.append((f"{path}:{n}", f"not valid JSON ({e.msg})"))
                    continue
                if not isinstance(rec, dict):
                    skipped.append((f"{path}:{n}", "not a JSON object"))
                    continue
                rows.append((n, rec))
        return rows
    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: a leading BOM is not part of the header
        header = f.readline()
        f.seek(0)
        # The header's separator: a comma, or what a spreadsheet writes where the comma is the decimal mark
        # (a semicolon; then "0,5" is a number), a tab or a bar.
        sep = max(_SEPARATORS, key=header.count) if any(c in header for c in _SEPARATORS) else ","
        reader = csv.DictReader(f, delimiter=sep)
        if not reader.fieldnames:
            raise ConfigError(f"data.manifest: {path} is empty (expected a header line)")
        for rec in reader:
            # line_num counts physical lines read so far, so quoted multi-line fields stay correct.
            if None in rec:
                skipped.append((f"{path}:{reader.line_num}", f"more fields than the header has (separator {sep!r})"))
                continue
            if sep == ";":  # where the comma is the decimal mark (a tab's or bar's "1,234" is a thousand)
                rec = {k: _DECIMAL_COMMA.sub(r"\1.\2", v) if isinstance(v, str) else v for k, v in rec.items()}
            rows.append((reader.line_num, rec))
    return rows


_SEPARATORS = (",", ";", "\t", "|")
_DECIMAL_COMMA = re.compile(r"^\s*([-+]?\d+),(\d+)\s*$")


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        v = float(value)
    else:
        try:
            v = float(str(value).strip())
        except ValueError:
            return None
    return v if math.isfinite(v) else None


def _inside(root: Path, value: str) -> Path | None:
    """``root / value`` normalised, or None when it leaves ``root`` (judged on the path text, not symlinks)."""
    base = os.path.normpath(os.path.abspath(root))
    full = os.path.normpath(os.path.join(base, value))
    if os.path.commonpath([base, full]) != base:
        return None
    return Path(full)


def discover_manifest(cfg: DataConfig, root: Path) -> DataSource:
    """The ``manifest`` format (see the module docstring)."""
    path = _inside(root, cfg.manifest)
    if path is None:  # never read (or echo) a file outside the dataset
        raise ConfigError(
            f"data.manifest: {cfg.manifest!r} lies outside data.root {root}; the manifest must be a "
            f"file inside the dataset folder"
        )
    if not path.is_file():
        raise ConfigError(f"data.manifest: {path} not found (a CSV with a header, or .jsonl, relative to data.root)")
    real, real_root = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    if not real.is_relative_to(real_root):  # a link out of the dataset: never read (or echo) what it points at
        raise ConfigError(
            f"data.manifest: {path} is a link to {real}, outside data.root {root}; the manifest must be a "
            f"file inside the dataset folder (copy it in)"
        )
    skipped: list[tuple[str, str]] = []
    rows = _read_manifest(path, skipped)
    if not rows:
        first = f" ({len(skipped)} skipped; the first, {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise ConfigError(f"data.manifest: {path} has no records{first}")
    columns: list[str] = []
    for _, rec in rows:
        columns += [k for k in rec if k not in columns]
    path_col = next((c for c in PATH_COLUMNS if c in columns), None)
    if path_col is None:
        raise ConfigError(
            f"data.manifest: {path} has no image column (one of {', '.join(PATH_COLUMNS)}); "
            f"columns: {', '.join(columns)}"
        )
    label_col = None if cfg.target_columns else next((c for c in LABEL_COLUMNS if c in columns), None)
    if label_col is not None and _fractional([rec.get(label_col) for _, rec in rows]):
        label_col = None  # 0.5, 2.25: a regression target named label, not classes
    if label_col is not None:
        names = _class_names([rec.get(label_col) for _, rec in rows])
        index = {c: i for i, c in enumerate(names)}

        def target(rec: dict[str, Any]) -> tuple[Any, str]:
            label = _label(rec.get(label_col))
            return (index[label], "") if label else (None, f"no class in column {label_col!r}")

        splits = _manifest_splits(root, path, rows, path_col, target, skipped)
        return _finish(root, "manifest", splits, cfg, skipped, class_names=names)
    if cfg.target_columns:
        missing = [c for c in cfg.target_columns if c not in columns]
        if missing:
            raise ConfigError(
                f"data.target_columns: {', '.join(missing)} not in {path} (columns: {', '.join(columns)})"
            )
        targets = list(cfg.target_columns)
    else:
        # "Mostly numbers" rather than "all numbers": one bad row must not silently drop a whole column.
        def numeric_share(c: str) -> float:
            vals = [rec.get(c) for _, rec in rows]
            return sum(_as_number(v) is not None for v in vals) / len(vals)

        rest = [c for c in columns if c not in (path_col, "split")]
        targets = [c for c in rest if numeric_share(c) > 0.5]
        if not targets:
            raise ConfigError(
                f"data.target_columns: {path} has no numeric columns besides {path_col!r} (a column of classes "
                f"is named one of {', '.join(LABEL_COLUMNS)}); name the targets in data.target_columns"
            )
        left = [c for c in rest if c not in targets]
        if left:
            example = next((rec.get(left[0]) for _, rec in rows if rec.get(left[0]) not in (None, "")), None)
            log.warning(
                "%s: column%s %s not numbers (%s = %r): not among the targets (%s); data.target_columns names "
                "the targets",
                path,
                "s" if len(left) > 1 else "",
                ", ".join(left) + (" are" if len(left) > 1 else " is"),
                left[0],
                example,
                ", ".join(targets),
            )

    def numbers(rec: dict[str, Any]) -> tuple[Any, str]:
        vals = [_as_number(rec.get(c)) for c in targets]
        bad = [c for c, v in zip(targets, vals) if v is None]
        if bad:
            return None, f"not a number in {', '.join(bad)}: {', '.join(repr(rec.get(c)) for c in bad)}"
        return vals, ""

    splits = _manifest_splits(root, path, rows, path_col, numbers, skipped)
    return _finish(root, "manifest", splits, cfg, skipped, target_names=targets)


def _fractional(values: list[Any]) -> bool:
    """Every value is a number and some are not whole: a measurement, not a class."""
    numbers = [_as_number(v) for v in values if _label(v)]
    return bool(numbers) and all(n is not None for n in numbers) and any(n != int(n) for n in numbers if n is not None)


def _label(value: Any) -> str:
    return str(value).strip() if value is not None else ""


def _class_names(values: list[Any]) -> list[str]:
    """The classes of a manifest's label column, as written, in order: by value when every one is a number
    (2 before 10), else alphabetically (as class folders are)."""
    names = sorted({label for v in values if (label := _label(v))})
    if names and all(_as_number(n) is not None for n in names):
        names.sort(key=lambda n: _as_number(n) or 0.0)
    return names


def _manifest_splits(
    root: Path,
    path: Path,
    rows: list[tuple[int, dict[str, Any]]],
    path_col: str,
    target: Any,
    skipped: list[tuple[str, str]],
) -> dict[str, Split]:
    """The manifest's rows as splits: ``target(record)`` gives a row's target, or None and why not."""
    rows_of: dict[str, tuple[list[str], list[Any]]] = {}
    for n, rec in rows:
        note_progress()  # a stat per row (see sources.note_progress)
        where = f"{path}:{n}"
        value = rec.get(path_col)
        if not isinstance(value, str) or not value.strip():
            skipped.append((where, f"no image path in column {path_col!r}"))
            continue
        image = _inside(root, value.strip())
        if image is None:
            raise ConfigError(f"data.manifest: {where}: image path {value!r} leaves data.root {root}")
        if not image.is_file():
            skipped.append((where, f"image {image} not found"))
            continue
        got, why = target(rec)
        if got is None:
            skipped.append((where, why))
            continue
        split = str(rec.get("split") or "train").strip().lower()
        if split not in SPLIT_NAMES:
            skipped.append((where, f"split {split!r} is not one of {', '.join(SPLIT_NAMES)}"))
            continue
        paths, values = rows_of.setdefault(split, ([], []))
        paths.append(str(image))
        values.append(got)
    return {name: Split(name, paths, values) for name, (paths, values) in rows_of.items()}


# -- drawing -------------------------------------------------------------------------------------------------
def parse_color(text: Any) -> tuple[float, float, float]:
    """``#rrggbb`` or ``#rgb`` -> (r, g, b) on 0..1; ValueError for anything else."""
    if not isinstance(text, str) or not _COLOR.match(text.strip()):
        raise ValueError(f"colour {text!r} is not #rrggbb")
    h = text.strip()[1:]
    if len(h) == 3:
        h = "".join(c * 2 for c in h)
    return tuple(int(h[i : i + 2], 16) / 255.0 for i in (0, 2, 4))  # type: ignore[return-value]


def _stroke_targets(json_path: Path, width: int, height: int) -> list[float]:
    """[x / W, y / H, r, g, b] from a step JSON; ValueError (with the reason) when unusable."""
    try:
        rec = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"not valid JSON ({e})") from None
    if not isinstance(rec, dict):
        raise ValueError("not a JSON object")
    x, y = _as_number(rec.get("x")), _as_number(rec.get("y"))
    if x is None or y is None:
        raise ValueError(f"x and y must be numbers, got x={rec.get('x')!r} y={rec.get('y')!r}")
    if not (0 <= x <= width and 0 <= y <= height):
        raise ValueError(f"point ({x:g}, {y:g}) lies outside the {width}x{height} canvas")
    r, g, b = parse_color(rec.get("color"))
    return [x / width, y / height, r, g, b]


def _session_dirs(folder: Path, reserved: set[str]) -> list[tuple[Path, list]]:
    """(folder, its entries) of the folders under ``folder`` (itself included) holding step files, sorted;
    reserved names are skipped at the top. Linked folders are followed once (a link loop ends discovery)."""
    out = []
    for d, entries in walk_folders(folder, skip=lambda parent, name: parent == folder and name in reserved):
        if any(_STEP.match(e.name) for e in entries):
            out.append((d, entries))
    return out


def _drawing_split(
    name: str, folder: Path, reserved: set[str], skipped: list[tuple[str, str]], groups: list[str]
) -> Split:
    paths: list[str] = []
    values: list[Any] = []
    for session, entries in _session_dirs(folder, reserved):
        canvases: dict[int, Path] = {}
        strokes: dict[int, Path] = {}
        for e in entries:
            m = _STEP.match(e.name)
            if not m:
                continue
            f = Path(e.path)
            kind, why = entry_kind(e)
            if kind != "file":
                if kind == "other":  # a FIFO, a broken link or a link loop named like a step: named, skipped
                    skipped.append((str(f), why or "not a regular file"))
                continue
            n, ext = int(m.group(1)), "." + m.group(2).lower()
            if ext == ".json":
                strokes[n] = f
            elif ext in IMAGE_EXTENSIONS:
                canvases[n] = f
        last = max(strokes, default=-1)
        for n, canvas in sorted(canvases.items()):
            note_progress()  # a header and a JSON file per step (see sources.note_progress)
            stroke = strokes.get(n + 1)
            if stroke is None:
                if n < last:  # a gap inside the session; the final canvas has no next stroke by nature
                    skipped.append((str(canvas), f"no stroke file step_{n + 1:04d}.json"))
                continue
            try:
                with Image.open(canvas) as im:  # reads the header only
                    width, height = im.size
            except DECODE_ERRORS as e:
                skipped.append((str(canvas), f"unreadable canvas ({e})"))
                continue
            try:
                targets = _stroke_targets(stroke, width, height)
            except ValueError as e:
                skipped.append((str(stroke), str(e)))
                continue
            paths.append(str(canvas))
            values.append(targets)
            groups.append(str(session))
        for n, stroke in sorted(strokes.items()):
            if n >= 1 and n - 1 not in canvases:
                skipped.append((str(stroke), f"no canvas step_{n - 1:04d} before this stroke"))
    return Split(name, paths, values)


def discover_drawing(cfg: DataConfig, root: Path) -> DataSource:
    """The ``drawing`` format (see the module docstring)."""
    skipped: list[tuple[str, str]] = []
    folders, reserved = split_folders(cfg, root)
    splits, train_groups = {}, []
    for name, folder in folders.items():
        groups: list[str] = []
        splits[name] = _drawing_split(name, folder, reserved if folder == root else set(), skipped, groups)
        if name == "train":
            train_groups = groups
    return _finish(root, "drawing", splits, cfg, skipped, groups=train_groups, target_names=list(DRAWING_TARGETS))


# -- paired --------------------------------------------------------------------------------------------------
def _by_stem(folder: Path) -> dict[str, Path]:
    """Images under ``folder`` keyed by relative path without extension."""
    return {str(p.relative_to(folder).with_suffix("")): p for p in list_images(folder)}


def _ab_folders(root: Path, split: str | None) -> tuple[Path, Path] | None:
    """(A, B) folders of a split: ``root/split/{A,B}`` or ``root/{A,B}/split``; root/{A,B} when split is None."""
    candidates: Iterable[tuple[Path, Path]]
    if split is None:
        candidates = [(root / "A", root / "B")]
    else:
        candidates = [(root / split / "A", root / split / "B"), (root / "A" / split, root / "B" / split)]
    for a, b in candidates:
        if a.is_dir() and b.is_dir():
            return a, b
    return None


def _paired_split(name: str, a: Path, b: Path, skipped: list[tuple[str, str]]) -> Split:
    left, right = _by_stem(a), _by_stem(b)
    paths: list[str] = []
    values: list[str] = []
    for key, pa in sorted(left.items()):
        pb = right.get(key)
        if pb is None:
            skipped.append((str(pa), f"no matching target image {b / key}.*"))
            continue
        paths.append(str(pa))
        values.append(str(pb))
    for key in sorted(set(right) - set(left)):
        skipped.append((str(right[key]), f"no matching input image {a / key}.*"))
    return Split(name, paths, values)


def _side_by_side_split(name: str, folder: Path, reserved: set[str]) -> Split:
    files = [p for p in list_images(folder) if not reserved or p.relative_to(folder).parts[0] not in reserved]
    nested = sorted({p.relative_to(folder).parts[0] for p in files if len(p.relative_to(folder).parts) > 1})
    if nested:  # class folders, likely: pix2pix's side-by-side images lie in the split's folder itself
        log.warning(
            "%s split %s: no A/ and B/ folders, so its images are read as side-by-side pairs (input left, target "
            "right), %d of them in sub-folders (%s): a classifier's folders? pix2pix wants A/ and B/, or AB images",
            name,
            folder,
            sum(len(p.relative_to(folder).parts) > 1 for p in files),
            ", ".join(nested[:5]) + (", ..." if len(nested) > 5 else ""),
        )
    return Split(name, [str(p) for p in files], [SIDE_BY_SIDE] * len(files))


def discover_paired(cfg: DataConfig, root: Path) -> DataSource:
    """The ``paired`` format (see the module docstring)."""
    skipped: list[tuple[str, str]] = []
    splits: dict[str, Split] = {}
    names = {"train": cfg.train_dir, "val": cfg.val_dir, "test": cfg.test_dir}
    for split, sub in names.items():
        ab = _ab_folders(root, sub)
        if ab is not None and sub not in {names[s] for s in splits}:  # a folder is one split (see split_folders)
            splits[split] = _paired_split(split, *ab, skipped)
    if "train" not in splits:
        ab = _ab_folders(root, None)
        if ab is not None and not any((ab[0] / s).is_dir() for s in names.values()):
            splits["train"] = _paired_split("train", *ab, skipped)
    if not splits:  # no A/B folders: side-by-side images
        folders, reserved = split_folders(cfg, root)
        for split, folder in folders.items():
            splits[split] = _side_by_side_split(split, folder, reserved if folder == root else set())
    if "train" not in splits:
        raise ConfigError(
            f"data.root: {root} has paired {', '.join(splits)} splits but no "
            f"{cfg.train_dir}/ split (expected {cfg.train_dir}/A and {cfg.train_dir}/B)"
        )
    return _finish(root, "paired", splits, cfg, skipped)
