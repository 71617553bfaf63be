import hashlib
import os
from pathlib import Path

import pytest
from PIL import Image

from fasttrain.cli import main
from fasttrain.data.checks import check_data


def _tree(root):
    (root / "a").mkdir(parents=True)
    Image.new("RGB", (16, 16), (1, 2, 3)).save(root / "a" / "ok.jpg")
    Image.new("RGBA", (16, 16)).save(root / "a" / "alpha.png")
    Image.new("RGB", (16, 16)).save(root / "a" / "really_png.jpg", format="PNG")
    good = root / "a" / "ok2.jpg"
    Image.new("RGB", (64, 64), (9, 9, 9)).save(good, quality=95)
    (root / "a" / "truncated.jpg").write_bytes(good.read_bytes()[:200])
    (root / "a" / "empty.png").write_bytes(b"")
    (root / "a" / "notes.txt").write_text("not an image")


def _digest(root):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_check_data_reports_bad_and_odd_and_touches_nothing(tmp_path):
    root = tmp_path / "data"
    _tree(root)
    before = _digest(root)
    report = check_data(root, skip_list=tmp_path / "skip.txt")
    assert report.total == 6  # notes.txt is not an image
    bad = {p.rsplit("/", 1)[1]: why for p, why in report.bad}
    assert set(bad) == {"truncated.jpg", "empty.png"}
    assert bad["empty.png"] == "empty file"
    odd = {p.rsplit("/", 1)[1]: why for p, why in report.odd}
    assert "mode RGBA" in odd["alpha.png"] and "PNG data in a .jpg file" in odd["really_png.jpg"]
    assert sorted((tmp_path / "skip.txt").read_text().split()) == sorted(p for p, _ in report.bad)
    assert _digest(root) == before
    with pytest.raises(FileExistsError):  # the skip list is never overwritten
        check_data(root, skip_list=tmp_path / "skip.txt")


def test_check_data_cli_exit_code(tmp_path, capsys):
    root = tmp_path / "data"
    _tree(root)
    assert main(["check-data", str(root)]) == 1
    out = capsys.readouterr().out
    assert "2 unreadable" in out and "truncated.jpg" in out
    clean = tmp_path / "clean" / "c"
    clean.mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(clean / "x.png")
    assert main(["check-data", str(tmp_path / "clean")]) == 0


# -- the cheap header check every loader runs -------------------------------------------------------------------


def _jpeg_with_segment(payload_len: int) -> bytes:
    """A valid JPEG with an APP2 segment of ``payload_len`` bytes before its frame header."""
    import io
    import struct

    buf = io.BytesIO()
    Image.new("RGB", (30, 20), (1, 2, 3)).save(buf, format="JPEG")
    data = buf.getvalue()
    app2 = b"\xff\xe2" + struct.pack(">H", payload_len + 2) + b"\x00" * payload_len
    return data[:2] + app2 * 3 + data[2:]  # three of them: the frame header sits ~190 KB in


def test_header_check_reads_sizes_and_flags_files_whose_pixels_need_pillow(tmp_path):
    from fasttrain.data.checks import check_header

    cases = {
        "rgb.png": (Image.new("RGB", (30, 20)), {}, False),
        "gray.png": (Image.new("L", (30, 20)), {}, False),
        "rgba.png": (Image.new("RGBA", (30, 20)), {}, True),
        "palette.png": (Image.new("P", (30, 20)), {}, True),
        "gray-trns.png": (Image.new("L", (30, 20)), {"transparency": 0}, True),
        "deep.png": (Image.new("I;16", (30, 20)), {}, True),
        "rgb.jpg": (Image.new("RGB", (30, 20)), {}, False),
        "gray.jpg": (Image.new("L", (30, 20)), {}, False),
        "progressive.jpg": (Image.new("RGB", (30, 20)), {"progressive": True}, False),
        "cmyk.jpg": (Image.new("CMYK", (30, 20)), {}, True),
        "rgb.bmp": (Image.new("RGB", (30, 20)), {}, True),
        "rgb.webp": (Image.new("RGB", (30, 20)), {}, True),
    }
    for name, (im, kw, pil) in cases.items():
        im.save(tmp_path / name, **kw)
        info, why = check_header(tmp_path / name)
        assert why is None and (info.width, info.height, info.pil) == (30, 20, pil), name
    (tmp_path / "big-exif.jpg").write_bytes(_jpeg_with_segment(65000))
    info, why = check_header(tmp_path / "big-exif.jpg")
    assert why is None and (info.width, info.height) == (30, 20)  # the SOF lies past the first 64 KiB read


def test_the_pixel_limit_is_strict_and_configurable(tmp_path):
    from fasttrain.data.checks import check_header

    Image.new("L", (100, 50)).save(tmp_path / "a.png")
    assert check_header(tmp_path / "a.png", max_pixels=5000)[1] is None  # exactly the limit passes, as in Pillow
    info, why = check_header(tmp_path / "a.png", max_pixels=4999)
    assert info is None and "100x50 = 5,000 pixels" in why and "data.max_image_pixels (4,999)" in why


def test_pixel_limit_default_is_pillows_bomb_error_threshold():
    from fasttrain.config import PILLOW_BOMB_PIXELS, ConfigError, DataConfig

    assert PILLOW_BOMB_PIXELS == 2 * Image.MAX_IMAGE_PIXELS == DataConfig().max_image_pixels
    for bad in ({"max_image_pixels": 0}, {"max_image_pixels": PILLOW_BOMB_PIXELS + 1}, {"max_bad_per_epoch": -1}):
        with pytest.raises(ConfigError, match=f"data.{next(iter(bad))}"):
            DataConfig(**bad)


def test_load_image_refuses_more_pixels_than_the_limit_before_decoding(tmp_path):
    from fasttrain.data.decode import load_image

    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    assert load_image(str(tmp_path / "a.png"), 3, max_pixels=1200).size == (40, 30)
    with pytest.raises(Image.DecompressionBombError, match="data.max_image_pixels"):
        load_image(str(tmp_path / "a.png"), 3, max_pixels=1199)


# -- the quick header check: the same verdicts as the full one ----------------------------------------------------


def _variants(good: list[str], out) -> list[str]:
    """Cut and damaged copies of good files: cut inside the header, the image data and the end marker; a header
    byte flipped; a frame header past the first 64 KiB; trailing bytes after the end marker."""
    import random

    rng = random.Random(0)
    made = []
    for n, p in enumerate(good):
        data = Path(p).read_bytes()
        if not data.startswith((b"\xff\xd8", b"\x89PNG")):
            continue
        cuts = {20, 40, 100, len(data) // 2, len(data) - 70, len(data) - 2, len(data) - 1}
        flips = rng.sample(range(2, min(300, len(data))), 12)
        for k, blob in [*((f"cut{c}", data[:c]) for c in sorted(cuts) if 0 < c < len(data))]:
            made.append(out(f"{n}-{k}{Path(p).suffix}", blob))
        for i in flips:
            made.append(out(f"{n}-flip{i}{Path(p).suffix}", data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1 :]))
        made.append(out(f"{n}-trailing{Path(p).suffix}", data + b"\0" * 100))
    return made


@pytest.fixture
def header_corpus(tmp_path, shared_extractor, tmp_path_factory):
    """badfiles' bad and good files, a set of plain and awkward JPEG/PNG files, a few hundred real JPEGs (from
    ../shared/data's imagenette224 when present), and damaged copies of them all."""
    import badfiles

    no_bomb = {k: v for k, v in badfiles.BAD.items() if k != "bomb.png"}  # its own test covers it (110 MB)
    good, bad = badfiles.write_corpus(tmp_path / "corpus", bad=no_bomb)
    kinds = {
        "rgb.png": (Image.new("RGB", (30, 20)), {}),
        "palette.png": (Image.new("P", (30, 20)), {}),
        "gray-trns.png": (Image.new("L", (30, 20)), {"transparency": 0}),
        "gray.jpg": (Image.new("L", (30, 20)), {}),
        "progressive.jpg": (Image.new("RGB", (31, 17)), {"progressive": True}),
        "optimized.jpg": (Image.new("RGB", (17, 31)), {"optimize": True}),
    }
    for name, (im, kw) in kinds.items():
        im.save(tmp_path / "corpus" / name, **kw)
        good.append(str(tmp_path / "corpus" / name))
    (tmp_path / "corpus" / "big-exif.jpg").write_bytes(_jpeg_with_segment(65000))
    good.append(str(tmp_path / "corpus" / "big-exif.jpg"))
    try:
        real_root = shared_extractor(
            "imagenette224", tmp_path_factory.getbasetemp(), lambda n: n.count("/") < 3 or n.endswith("00.JPEG")
        )
        real = sorted(str(p) for p in real_root.rglob("*.JPEG"))[:200]
    except pytest.skip.Exception:
        real = []
    var = tmp_path / "variants"
    var.mkdir()

    def out(name: str, blob: bytes) -> str:
        (var / name).write_bytes(blob)
        return str(var / name)

    return good, bad, real, _variants(good + real[:40], out)


def test_the_quick_check_gives_the_full_checks_verdicts_and_pillows_sizes(header_corpus):
    from fasttrain.data import checks

    good, bad, real, variants = header_corpus
    quick = 0
    for p in good + bad + real + variants:
        for limit in (checks.PILLOW_BOMB_PIXELS, 600):
            got = checks.check_file_stat(p, limit)
            assert got[:3] == checks._check_file_slow(p, limit), (p, limit)
            if got[3] is not None:
                st = os.stat(p)
                assert got[3] == (st.st_size, st.st_mtime_ns)
    assert all(checks.check_file(p)[0] is not None for p in good + real)
    refused = [Path(p).name for p in bad if checks.check_file(p)[0] is None]
    assert refused == [Path(p).name for p in bad if "deflate" not in p]  # a bad deflate stream needs the decode
    for p in good + real:
        with Image.open(p) as im:
            assert (checks.check_file(p)[0].width, checks.check_file(p)[0].height) == im.size, p
        data = Path(p).read_bytes()
        quick += checks._quick_header(data[:65536], data[-64:], checks.PILLOW_BOMB_PIXELS) is not None
    assert quick == len(good + real) - 1  # all but big-exif.jpg, whose frame header lies past the first 64 KiB


def test_pillows_pixel_limit_warning_is_not_printed_amid_a_commands_report(tmp_path, monkeypatch):
    """A 108 MP panorama made check-data print Pillow's DecompressionBombWarning; data.max_image_pixels is the
    limit fasttrain applies (here Pillow's warning threshold is lowered to a 12 x 12 image's 144 pixels)."""
    import warnings

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (12, 12)).save(tmp_path / cls / "x.png")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        Image.open(tmp_path / "a" / "x.png").close()
        assert any("decompression bomb" in str(w.message) for w in seen)  # Pillow warns, as it would of 108 MP
        seen.clear()
        assert main(["check-data", str(tmp_path)]) == 0
    assert not [w for w in seen if "decompression bomb" in str(w.message)]


def test_odd_files_are_reported_by_kind_the_rare_kinds_first():
    """The report cut its odd list at 50 in file order: one PNG named .jpg was lost under dozens of grayscale
    photos' 'mode L' notes."""
    from fasttrain.data.checks import CheckReport

    odd = [(f"/d/gray_{i:02d}.jpg", "mode L, converted to RGB") for i in range(60)]
    odd.insert(40, ("/d/really_png.jpg", "PNG data in a .jpg file"))
    odd += [("/d/t1.png", "tiny (4x4)"), ("/d/t2.png", "tiny (6x2)")]
    report = CheckReport(Path("/d"), total=70, bad=[], odd=odd)
    lines = report.to_text().splitlines()[1:]
    assert lines[0] == "  odd  /d/really_png.jpg: PNG data in a .jpg file"
    assert lines[1:3] == ["  odd  /d/t1.png: tiny (4x4)", "  odd  /d/t2.png: tiny (6x2)"]  # one kind, sizes aside
    assert lines[3:8] == [f"  odd  /d/gray_{i:02d}.jpg: mode L, converted to RGB" for i in range(5)]
    assert lines[8:] == ["  ... and 55 more odd files: mode L, converted to RGB"]


def test_check_data_on_pairs_or_a_manifest_names_what_training_leaves_out(tmp_path, capsys):
    """Training's end sends the user to check-data, which read A/ and B/ as two classes and reported nothing
    of the 11 pairs without a partner."""
    from fasttrain.data.synthetic import make_paired_dataset

    pairs = make_paired_dataset(tmp_path / "pairs", n=6, size=16, val_fraction=0)
    lost = sorted((pairs / "train" / "B").iterdir())[0]
    lost.unlink()
    assert main(["check-data", str(pairs)]) == 0  # a note: every image reads
    out = capsys.readouterr().out
    assert "LAYOUT  as data.format = paired, training leaves out 1 record:" in out
    assert f"LEFT OUT  {pairs / 'train' / 'A' / lost.name}: no matching target image" in out

    rows = tmp_path / "rows"
    for cls in ("cat", "fish"):
        (rows / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(rows / cls / "a.png")
    (rows / "labels.csv").write_text("path,label\ncat/a.png,cat\nfish/a.png,fish\ngone.png,cat\n")
    main(["check-data", str(rows)])
    out = capsys.readouterr().out
    assert "LAYOUT  as data.format = manifest, training leaves out 1 record:" in out and "gone.png not found" in out


def test_check_data_says_the_layout_warnings_training_gives(tmp_path, capsys):
    """Images beside the class folders and folders differing only in case: training warned, check-data did not."""
    for cls in ("cat", "Cat", "fish"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "train" / cls / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "stray.png")
    assert main(["check-data", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "  LAYOUT  1 image directly in" in out and "in no class folder, is not used (stray.png)" in out
    assert "  LAYOUT  class folders Cat and cat in" in out
