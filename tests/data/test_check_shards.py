"""``fasttrain check-data`` on tar shards (a packed folder, one ``.tar``, a brace pattern): every image member is
checked as a file is, a bad one named ``<shard>.tar:<member>`` with the same reason, summary and exit status."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import badfiles
import numpy as np
import pytest
from PIL import Image

from fasttrain.cli import main
from fasttrain.config import DataConfig
from fasttrain.data.checks import check_data
from fasttrain.data.files import INDEX_SUFFIX, open_regular, split_address
from fasttrain.data.pack import pack

BAD = ("corrupt-deflate.png", "truncated.jpg", "text.jpg", "empty.jpg")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> tuple[Path, Path]:
    """(a class-folder tree of noise images, four bad files and an odd CMYK JPEG; its shards, several)."""
    base = tmp_path_factory.mktemp("check-shards")
    rng = np.random.default_rng(4)
    for i in range(16):
        d = base / "files" / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        h, w = (int(v) for v in rng.integers(16, 32, 2))
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(d / f"{i:02d}.{'jpg' if i % 3 else 'png'}")
    for name in BAD:
        badfiles.BAD[name](base / "files" / "a" / name)
    badfiles.write_cmyk_jpeg(base / "files" / "b" / "cmyk.jpg")
    # pack skips what the pre-check refuses; these shards must hold the bad files, as shards made elsewhere may
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("fasttrain.data.pack._read", lambda path, max_pixels: Path(path).read_bytes())
        pack(DataConfig(root=str(base / "files"), val_fraction=0.0), base / "shards", shard_bytes=4096)  # all: train
    return base / "files", base / "shards"


def _by_content(entries: list[tuple[str, str]]) -> dict[str, str]:
    """{digest of the file's or member's bytes: the verdict}: a member and the file it was packed from match."""
    out = {}
    for path, why in entries:
        with open_regular(path) as f:
            out[_sha(f.read())] = why
    return out


def _shards_holding(shards: Path, files: Path, names: tuple[str, ...]) -> list[Path]:
    """The training shards holding a member with the bytes of one of ``names`` (read from the shards' indexes)."""
    wanted = {_sha((files / "a" / n).read_bytes()) for n in names}
    hits = []
    for shard in sorted(shards.glob("train-*.tar")):
        members = json.loads(Path(f"{shard}{INDEX_SUFFIX}").read_text())["members"]
        data = shard.read_bytes()
        if any(_sha(data[off : off + size]) in wanted for _, off, size in members):
            hits.append(shard)
    return hits


def test_a_packed_folder_is_checked_member_by_member_as_its_files_were(packed):
    files, shards = packed
    on_files, on_shards = check_data(files, workers=1), check_data(shards, workers=1)
    assert on_shards.total == on_files.total == 16 + len(BAD) + 1
    assert len(on_shards.bad) == len(BAD)
    for address, _ in on_shards.bad + on_shards.odd:
        shard, member = split_address(address) or ("", "")
        assert Path(shard).parent == shards and Path(shard).suffix == ".tar" and "." in member, address
    assert _by_content(on_shards.bad) == _by_content(on_files.bad)  # each member: its file's reason
    assert _by_content(on_shards.odd) == _by_content(on_files.odd)  # the CMYK JPEG's conversion note


def test_the_cli_names_bad_members_of_one_shard_or_a_pattern_with_the_folders_exit_codes(packed, tmp_path, capsys):
    files, shards = packed
    holding = _shards_holding(shards, files, BAD)
    assert holding, "pack put the bad files somewhere"
    one = holding[0]
    assert main(["check-data", str(one), "-q", "--skip-list", str(tmp_path / "skip.txt")]) == 1
    out = capsys.readouterr().out
    listed = (tmp_path / "skip.txt").read_text().split()
    assert listed and all(a.startswith(f"{one}:") for a in listed)
    assert all(f"  BAD  {a}: " in out for a in listed)
    assert out.startswith(f"{one}: ") and f", {len(listed)} unreadable, " in out
    pattern = str(shards / f"train-{{000000..{len(list(shards.glob('train-*.tar'))) - 1:06d}}}.tar")
    assert main(["check-data", pattern, "-q"]) == 1
    assert f"{len(BAD)} unreadable" in capsys.readouterr().out
    clean = [s for s in sorted(shards.glob("train-*.tar")) if s not in holding]
    assert clean, "some shard holds only good images"
    assert main(["check-data", str(clean[0]), "-q"]) == 0
    assert ", 0 unreadable, " in capsys.readouterr().out
