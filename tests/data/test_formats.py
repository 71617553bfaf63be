import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from fasttrain.config import ConfigError, DataConfig
from fasttrain.data.formats import DRAWING_TARGETS, SIDE_BY_SIDE, parse_color
from fasttrain.data.sources import discover
from fasttrain.data.synthetic import DRAWING_PALETTE, make_drawing_dataset, make_imagenet_like, make_paired_dataset

REPO = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())


def png(path: Path, size=(16, 12), color=(255, 255, 255)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def stroke(path: Path, **rec) -> Path:
    path.write_text(json.dumps(rec) if not isinstance(rec.get("raw"), str) else rec["raw"])
    return path


def skipped_reasons(src) -> dict[str, str]:
    return {Path(f).name: why for f, why in src.skipped}


# -- drawing -------------------------------------------------------------------------------------------------
def test_drawing_generator_writes_canvases_and_strokes(tmp_path):
    root = make_drawing_dataset(tmp_path / "d", sessions=3, steps=4, size=(40, 30))
    session = root / "session_0000"
    names = sorted(p.name for p in session.iterdir())
    assert names == [
        "step_0000.png",
        "step_0001.json",
        "step_0001.png",
        "step_0002.json",
        "step_0002.png",
        "step_0003.json",
        "step_0003.png",
        "step_0004.json",
        "step_0004.png",
    ]
    rec = json.loads((session / "step_0001.json").read_text())
    assert rec["color"] in DRAWING_PALETTE and 0 <= rec["x"] <= 40 and 0 <= rec["y"] <= 30
    with Image.open(session / "step_0000.png") as im:
        assert im.size == (40, 30)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    with pytest.raises(FileExistsError, match="d already exists"):
        make_drawing_dataset(root, sessions=1, steps=1)


def test_drawing_pairs_canvas_n_with_stroke_n_plus_1(tmp_path):
    root = make_drawing_dataset(tmp_path / "d", sessions=2, steps=3, size=(40, 20), val_sessions=1)
    src = discover(DataConfig(format="drawing"), root)
    assert src.target_names == DRAWING_TARGETS and src.skipped == []
    assert len(src.train) == 2 * 3 and len(src.val) == 3  # the final canvas of a session has no next stroke
    i = src.train.paths.index(str(root / "train" / "session_0000" / "step_0001.png"))
    rec = json.loads((root / "train" / "session_0000" / "step_0002.json").read_text())
    r, g, b = parse_color(rec["color"])
    assert src.train.targets[i] == pytest.approx([rec["x"] / 40, rec["y"] / 20, r, g, b])
    # the next stroke starts where the previous one ended (what makes the data learnable)
    prev = json.loads((root / "train" / "session_0000" / "step_0001.json").read_text())
    assert [rec["x"], rec["y"]] == prev["points"][-1]
    assert DRAWING_PALETTE.index(rec["color"]) == (DRAWING_PALETTE.index(prev["color"]) + 1) % len(DRAWING_PALETTE)


def test_drawing_bad_records_are_reported_and_skipped(tmp_path):
    s = tmp_path / "d" / "s1"
    for n in range(7):
        png(s / f"step_{n:04d}.png", size=(20, 10))
    stroke(s / "step_0001.json", x=10, y=5, color="#ff4444")  # good
    stroke(s / "step_0002.json", raw="{not json")  # malformed JSON
    stroke(s / "step_0003.json", x=1, y=1, color="red")  # bad colour string
    stroke(s / "step_0004.json", x=50, y=1, color="#00ff00")  # outside the canvas
    # step_0005.json missing: canvas 4 has no pair although later strokes exist
    stroke(s / "step_0006.json", x=2, y=3, color="#0f0")  # good (#rgb)
    stroke(s / "step_0008.json", x=2, y=3, color="#000000")  # no canvas 7 before it (and a gap after 6)
    s2 = tmp_path / "d" / "s2"
    png(s2 / "step_0000.png").write_bytes(b"not a png")  # unreadable canvas
    stroke(s2 / "step_0001.json", x=1, y=1, color="#000000")
    src = discover(DataConfig(format="drawing", val_fraction=0.0), tmp_path / "d")
    assert [Path(p).name for p in src.train.paths] == ["step_0000.png", "step_0005.png"]
    assert src.train.targets[0] == pytest.approx([0.5, 0.5, 1.0, 0x44 / 255, 0x44 / 255])
    assert src.train.targets[1] == pytest.approx([0.1, 0.3, 0.0, 1.0, 0.0])
    why = skipped_reasons(src)
    assert "not valid JSON" in why["step_0002.json"]
    assert "#rrggbb" in why["step_0003.json"]
    assert "outside the 20x10 canvas" in why["step_0004.json"]
    assert "step_0005.json" in why["step_0004.png"]
    assert "no canvas step_0007" in why["step_0008.json"]
    assert "step_0007.json" in why["step_0006.png"]
    assert "unreadable canvas" in why["step_0000.png"]
    assert len(src.skipped) == 7


def test_drawing_holds_out_whole_sessions(tmp_path):
    root = make_drawing_dataset(tmp_path / "d", sessions=10, steps=3, size=16)
    src = discover(DataConfig(format="drawing", val_fraction=0.2, split_seed=1), root)
    sessions = lambda split: {Path(p).parent.name for p in split.paths}  # noqa: E731
    assert len(sessions(src.val)) == 2 and not sessions(src.train) & sessions(src.val)
    assert len(src.train) + len(src.val) == 30


def test_drawing_link_loops_are_walked_once(tmp_path):
    """``ln -s .. session/up`` used to list every file again through the loop (96 samples became 3,544 train +
    392 val, each file in both splits); two loops never ended. Each canvas is listed once."""
    root = make_drawing_dataset(tmp_path / "d", sessions=4, steps=3, size=16)
    plain = discover(DataConfig(format="drawing", val_fraction=0.25), root)
    (root / "session_0000" / "up").symlink_to("..")
    src = discover(DataConfig(format="drawing", val_fraction=0.25), root)
    assert src.train.paths == plain.train.paths and src.val.paths == plain.val.paths
    (root / "session_0001" / "again").symlink_to("..")
    (root / "session_0002" / "self").symlink_to(".")

    def endless(signum, frame):
        raise TimeoutError("discovery did not end within 30 s")

    old = signal.signal(signal.SIGALRM, endless)
    signal.alarm(30)
    try:
        src = discover(DataConfig(format="drawing", val_fraction=0.25), root)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert src.train.paths == plain.train.paths and src.val.paths == plain.val.paths
    assert len(src.train) + len(src.val) == 4 * 3 and not set(src.train.paths) & set(src.val.paths)


def test_drawing_step_that_is_a_link_loop_is_skipped_by_name(tmp_path):
    root = make_drawing_dataset(tmp_path / "d", sessions=2, steps=3, size=16)
    s = root / "session_0000"
    (s / "step_0009.png").symlink_to("step_0010.png")
    (s / "step_0010.png").symlink_to("step_0009.png")
    src = discover(DataConfig(format="drawing", val_fraction=0.0), root)
    assert len(src.train) == 2 * 3
    assert "too many levels of symbolic links" in skipped_reasons(src)["step_0009.png"].lower()


@pytest.mark.parametrize("text,rgb", [("#ff0000", (1, 0, 0)), ("#00F", (0, 0, 1)), (" #808080 ", (128 / 255,) * 3)])
def test_parse_color(text, rgb):
    assert parse_color(text) == pytest.approx(rgb)


@pytest.mark.parametrize("bad", ["ff0000", "#ff00", "#gg0000", None, 7, "rgb(1,2,3)"])
def test_parse_color_rejects(bad):
    with pytest.raises(ValueError):
        parse_color(bad)


# -- manifest ------------------------------------------------------------------------------------------------
def test_manifest_csv_targets_splits_and_bad_rows(tmp_path, caplog):
    for name in ("a", "b", "c", "d", "e", "f"):
        png(tmp_path / "img" / f"{name}.png")
    (tmp_path / "labels.csv").write_text(
        "path,age,score,note,split\n"
        "img/a.png,30,0.5,cat,train\n"
        "img/b.png,40,0.25,dog,train\n"
        "img/c.png,oops,0.1,dog,train\n"  # line 4: not a number
        "img/missing.png,1,1,cat,train\n"  # line 5: no such file
        "img/d.png,50,0.75,cat,val\n"
        "img/e.png,60,1.0,cat,test\n"
        "img/f.png,70,1.0,cat,holdout\n"
    )  # line 8: unknown split
    src = discover(DataConfig(format="manifest"), tmp_path)
    assert src.target_names == ["age", "score"]  # note is not numeric, split is not a target
    assert "column note is not numbers (note = 'cat'): not among the targets (age, score)" in caplog.text
    assert [Path(p).name for p in src.train.paths] == ["a.png", "b.png"]
    assert src.train.targets == [[30.0, 0.5], [40.0, 0.25]]
    assert [Path(p).name for p in src.val.paths] == ["d.png"] and len(src.test) == 1
    where = {f.rsplit(":", 1)[1]: why for f, why in src.skipped}
    assert set(where) == {"4", "5", "8"}
    assert "age" in where["4"] and "not found" in where["5"] and "holdout" in where["8"]

    chosen = discover(DataConfig(format="manifest", target_columns=["score"]), tmp_path)
    assert chosen.target_names == ["score"] and len(chosen.train) == 3  # row 4's age no longer matters


def test_a_manifest_with_a_label_column_holds_classes_and_trains_a_classifier(tmp_path):
    """A CSV of image and class name (Kaggle's layout) was refused: 'no numeric columns besides image'."""
    from tinyrun import tiny_cfg

    from fasttrain.engine import train

    colours = {"cat": (255, 0, 0), "fish": (0, 0, 255)}
    rows = []
    for i in range(24):
        label = "cat" if i % 3 else "fish"
        png(tmp_path / "photos" / f"IMG_{i:04d}.png", (32, 32), colours[label])
        rows.append(f"photos/IMG_{i:04d}.png,{label}\n")
    rows.append("photos/IMG_0001.png,\n")  # line 26: no class
    (tmp_path / "labels.csv").write_text("filename,label\n" + "".join(rows))
    src = discover(DataConfig(format="manifest", val_fraction=0.25), tmp_path)
    assert src.class_names == ["cat", "fish"] and src.target_names is None
    assert sorted(src.train.targets + src.val.targets) == [0] * 16 + [1] * 8
    assert sorted(src.val.targets) == [0, 0, 0, 0, 1, 1]  # held out per class
    assert [why for _, why in src.skipped] == ["no class in column 'label'"]

    (tmp_path / "numbered.csv").write_text(
        "image,class\n" + "".join(f"photos/IMG_{i:04d}.png,{i % 12}\n" for i in range(24))
    )
    numbered = discover(DataConfig(format="manifest", manifest="numbered.csv", val_fraction=0), tmp_path)
    assert numbered.class_names == [str(n) for n in range(12)]  # by value: 2 before 10
    # a regression target named label (fractions): numbers, as before such columns made classes
    (tmp_path / "scores.csv").write_text(
        "path,label\n" + "".join(f"photos/IMG_{i:04d}.png,{i / 4}\n" for i in range(24))
    )
    scores = discover(DataConfig(format="manifest", manifest="scores.csv", val_fraction=0), tmp_path)
    assert scores.class_names is None and scores.target_names == ["label"]
    # one class alone: not called a class folder
    (tmp_path / "cats.csv").write_text("path,label\n" + "".join(f"photos/IMG_{i:04d}.png,cat\n" for i in range(24)))
    one = tiny_cfg(tmp_path, tmp_path / "runs", "data.format=manifest", "data.manifest=cats.csv")
    with pytest.raises(ValueError, match=r"model.num_outputs: a classifier needs at least 2 classes \(found 1"):
        train(one, progress=False)

    cfg = tiny_cfg(tmp_path, tmp_path / "runs", "data.format=manifest", "train.batch_size=8", epochs=1, max_steps=2)
    result = train(cfg, progress=False)
    assert "val_acc" in result.history[0]
    with pytest.raises(ConfigError, match="its column of classes makes it a classifier's"):
        train(tiny_cfg(tmp_path, tmp_path / "runs", "data.format=manifest", "task.name=regress"), progress=False)


def test_a_spreadsheets_semicolon_manifest_with_decimal_commas_is_read(tmp_path):
    """Excel where the comma is the decimal mark writes ';' between fields: every row was skipped ('more fields
    than the header has') and the error said only that the manifest had no records."""
    for name in "abc":
        png(tmp_path / f"{name}.png")
    (tmp_path / "labels.csv").write_text("file;x;y\na.png;0,5;1\nb.png;2,25;-3,5\nc.png;1;2;3\n")
    src = discover(DataConfig(format="manifest", val_fraction=0), tmp_path)
    assert src.train.targets == [[0.5, 1.0], [2.25, -3.5]]
    (tmp_path / "tabs.csv").write_text("file\tx\na.png\t1,234\nb.png\t2\nc.png\t3\n")  # a tab's 1,234: no decimal
    tabs = discover(DataConfig(format="manifest", manifest="tabs.csv", val_fraction=0), tmp_path)
    assert tabs.train.targets == [[2.0], [3.0]] and "not a number in x: '1,234'" in tabs.skipped[0][1]
    assert [why for _, why in src.skipped] == ["more fields than the header has (separator ';')"]
    (tmp_path / "labels.csv").write_text("file,x\na.png,1,2\n")
    with pytest.raises(ConfigError, match=r"has no records \(1 skipped; the first, .*:2: more fields than the header"):
        discover(DataConfig(format="manifest"), tmp_path)


def test_a_classifier_on_a_manifests_numeric_targets_is_refused_before_a_run_folder_exists(tmp_path):
    """The quickstart's classify task on a manifest crashed in its first step (a tensor size mismatch)."""
    from tinyrun import tiny_cfg

    from fasttrain.engine import train

    for name in "abcdefgh":
        png(tmp_path / "img" / f"{name}.png")
    (tmp_path / "labels.csv").write_text(
        "path,x,y\n" + "".join(f"img/{n}.png,{i},{i / 2}\n" for i, n in enumerate("abcdefgh"))
    )
    cfg = tiny_cfg(tmp_path, tmp_path / "runs", "data.format=manifest", "data.val_fraction=0.25")
    with pytest.raises(
        ConfigError,
        match=r"task.name = classify: .* holds numeric targets per image \(x, y\), not "
        r"classes: set task.name = regress",
    ):
        train(cfg, progress=False)
    assert not (tmp_path / "runs").exists()


def test_manifest_path_leaving_the_root_is_refused_with_its_line(tmp_path):
    png(tmp_path / "data" / "a.png")
    png(tmp_path / "secret.png")
    (tmp_path / "data" / "labels.csv").write_text("image,y\na.png,1\n../secret.png,2\n")
    with pytest.raises(ConfigError, match=r"labels.csv:3: image path '\.\./secret.png' leaves data.root"):
        discover(DataConfig(format="manifest"), tmp_path / "data")
    (tmp_path / "data" / "labels.csv").write_text(f"image,y\na.png,1\n{tmp_path / 'secret.png'},2\n")
    with pytest.raises(ConfigError, match="labels.csv:3"):
        discover(DataConfig(format="manifest"), tmp_path / "data")


def test_manifest_jsonl_with_holdout_and_malformed_lines(tmp_path):
    lines = []
    for i in range(20):
        png(tmp_path / f"{i}.png")
        lines.append(json.dumps({"file": f"{i}.png", "x": i / 20, "y": 1 - i / 20}))
    lines.insert(3, "{broken")
    lines.insert(5, "[1, 2]")
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    src = discover(DataConfig(format="manifest", manifest="m.jsonl", val_fraction=0.25, split_seed=3), tmp_path)
    assert src.target_names == ["x", "y"]
    assert len(src.train) == 15 and len(src.val) == 5
    assert not set(src.train.paths) & set(src.val.paths)
    assert [f.rsplit(":", 1)[1] for f, _ in src.skipped] == ["4", "6"]
    again = discover(DataConfig(format="manifest", manifest="m.jsonl", val_fraction=0.25, split_seed=3), tmp_path)
    assert again.val.paths == src.val.paths  # seeded


def test_manifest_layout_errors_name_the_setting(tmp_path):
    with pytest.raises(ConfigError, match="data.manifest"):
        discover(DataConfig(format="manifest"), tmp_path)
    (tmp_path / "labels.csv").write_text("name,y\na.png,1\n")
    with pytest.raises(ConfigError, match="no image column"):
        discover(DataConfig(format="manifest"), tmp_path)
    (tmp_path / "labels.csv").write_text("path,y\na.png,1\n")
    with pytest.raises(ConfigError, match="data.target_columns: z"):
        discover(DataConfig(format="manifest", target_columns=["z"]), tmp_path)


def test_manifest_with_a_byte_order_mark_is_read(tmp_path):
    """Excel's "CSV UTF-8" starts with a BOM: the first column is still called path."""
    png(tmp_path / "a.png")
    png(tmp_path / "b.png")
    (tmp_path / "labels.csv").write_bytes("\ufeffpath,size\na.png,1\nb.png,2\n".encode())
    src = discover(DataConfig(format="manifest", val_fraction=0), tmp_path)
    assert src.target_names == ["size"] and len(src.train) == 2 and src.skipped == []
    (tmp_path / "m.jsonl").write_bytes('\ufeff{"path": "a.png", "y": 1}\n{"path": "b.png", "y": 2}\n'.encode())
    assert len(discover(DataConfig(format="manifest", manifest="m.jsonl", val_fraction=0), tmp_path).train) == 2


@pytest.mark.parametrize("name", ["labels.csv", "m.jsonl"])
def test_manifest_that_is_not_utf8_names_the_file(tmp_path, name):
    png(tmp_path / "é.png")
    text = "path,y\né.png,1\n" if name.endswith(".csv") else '{"path": "é.png", "y": 1}\n'
    (tmp_path / name).write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"data\.manifest: .*{name} is not UTF-8 text"):
        discover(DataConfig(format="manifest", manifest=name), tmp_path)


@pytest.mark.parametrize("where", ["../secret.csv", "{abs}"])
def test_manifest_outside_the_root_is_refused_without_its_content(tmp_path, where):
    (tmp_path / "data").mkdir()
    secret = tmp_path / "secret.csv"
    secret.write_text("hunter2,topsecret\nmore,lines\n")
    with pytest.raises(ConfigError, match=r"data\.manifest: .* lies outside data\.root") as e:
        discover(DataConfig(format="manifest", manifest=where.format(abs=secret)), tmp_path / "data")
    assert "hunter2" not in str(e.value) and "topsecret" not in str(e.value)


def test_manifest_that_links_outside_the_root_is_refused_unread(tmp_path, monkeypatch):
    """labels.csv -> a file outside the dataset: judged on where the link leads, and never opened (it used to
    be read and its first line shown in the error)."""
    (tmp_path / "data").mkdir()
    secret = tmp_path / "secret.csv"
    secret.write_text("hunter2,topsecret\nmore,lines\n")
    (tmp_path / "data" / "labels.csv").symlink_to(secret)
    opened: list[str] = []
    real_open = open

    def spy(file, *a, **k):
        opened.append(str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr("builtins.open", spy)
    with pytest.raises(ConfigError, match=r"data\.manifest: .*labels\.csv is a link to .*secret\.csv, outside") as e:
        discover(DataConfig(format="manifest", manifest="labels.csv"), tmp_path / "data")
    assert "hunter2" not in str(e.value) and not any("labels.csv" in f or "secret" in f for f in opened)


def test_manifest_linked_within_the_root_is_read(tmp_path):
    png(tmp_path / "a.png")
    (tmp_path / "real.csv").write_text("path,y\na.png,1\n")
    (tmp_path / "labels.csv").symlink_to("real.csv")
    src = discover(DataConfig(format="manifest", manifest="labels.csv", val_fraction=0.0), tmp_path)
    assert src.train.paths == [str(tmp_path / "a.png")]


# -- paired --------------------------------------------------------------------------------------------------
def test_paired_generator_folders_layout(tmp_path):
    root = make_paired_dataset(tmp_path / "p", n=10, size=32)
    src = discover(DataConfig(format="paired"), root)
    assert len(src.train) == 8 and len(src.val) == 2 and src.skipped == []
    for a, b in zip(src.train.paths, src.train.targets):
        assert Path(a).parent.name == "A" and Path(b).parent.name == "B" and Path(a).name == Path(b).name
    with Image.open(src.train.paths[0]) as im:
        assert im.size == (32, 32)


def test_class_folders_read_as_side_by_side_pairs_are_warned_of(tmp_path, caplog):
    """pix2pix on a classifier's folders (no A/ and B/) trained on every image as a pair without a word."""
    for cls in ("cat", "fish"):
        for i in range(3):
            png(tmp_path / "train" / cls / f"{i}.png")
    with caplog.at_level("WARNING", logger="fasttrain"):
        src = discover(DataConfig(format="paired", val_fraction=0.0), tmp_path)
    assert len(src.train) == 6
    assert "6 of them in sub-folders (cat, fish): a classifier's folders?" in caplog.text
    caplog.clear()
    make_paired_dataset(tmp_path / "ab", n=4, size=16, layout="side_by_side", seed=1)
    with caplog.at_level("WARNING", logger="fasttrain"):
        discover(DataConfig(format="paired"), tmp_path / "ab")
    assert "sub-folders" not in caplog.text


def test_paired_generator_side_by_side_layout(tmp_path):
    root = make_paired_dataset(tmp_path / "p", n=5, size=32, layout="side_by_side")
    src = discover(DataConfig(format="paired"), root)
    assert len(src.train) == 4 and len(src.val) == 1
    assert set(src.train.targets) == {SIDE_BY_SIDE}
    with Image.open(src.train.paths[0]) as im:
        assert im.size == (64, 32)


def test_paired_matches_by_name_and_reports_orphans(tmp_path):
    png(tmp_path / "A" / "x.jpg")
    png(tmp_path / "B" / "x.png")  # another extension still pairs
    png(tmp_path / "A" / "sub" / "y.png")
    png(tmp_path / "B" / "sub" / "y.png")
    png(tmp_path / "A" / "only_a.png")
    png(tmp_path / "B" / "only_b.png")
    src = discover(DataConfig(format="paired", val_fraction=0.0), tmp_path)
    assert sorted(Path(p).name for p in src.train.paths) == ["x.jpg", "y.png"]
    why = skipped_reasons(src)
    assert "no matching target" in why["only_a.png"] and "no matching input" in why["only_b.png"]


def test_paired_reference_layout_a_train_b_train(tmp_path):
    for split in ("train", "val"):
        for i in range(3):
            png(tmp_path / "A" / split / f"{i}.png")
            png(tmp_path / "B" / split / f"{i}.png")
    src = discover(DataConfig(format="paired"), tmp_path)
    assert len(src.train) == 3 and len(src.val) == 3


def test_paired_root_ab_with_val_folder(tmp_path):
    for i in range(4):
        png(tmp_path / "A" / f"{i}.png")
        png(tmp_path / "B" / f"{i}.png")
    png(tmp_path / "val" / "A" / "v.png")
    png(tmp_path / "val" / "B" / "v.png")
    src = discover(DataConfig(format="paired"), tmp_path)
    assert len(src.train) == 4 and [Path(p).name for p in src.val.paths] == ["v.png"]


def test_a_folder_named_by_val_dir_and_test_dir_is_one_split_the_validation_one(tmp_path):
    """CIFAR-10's layout (train/, test/) with ``val_dir = "test"``: test/ was also the test split, evaluated (and
    cached) a second time after training; a folder is now one split."""
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            for i in range(n):
                png(tmp_path / "classes" / split / cls / f"{i}.png")
        for side in ("A", "B"):
            for i in range(n):
                png(tmp_path / "pairs" / side / split / f"{i}.png")
    for fmt, root in (("folder", "classes"), ("paired", "pairs")):
        src = discover(DataConfig(format=fmt, val_dir="test"), tmp_path / root)
        assert (len(src.train), len(src.val), src.test) == (
            6 if fmt == "folder" else 3,
            4 if fmt == "folder" else 2,
            None,
        )
        both = discover(DataConfig(format=fmt, val_dir="test", test_dir="test"), tmp_path / root)
        assert both.test is None and len(both.val) == len(src.val)
        kept = discover(DataConfig(format=fmt), tmp_path / root)  # the defaults: test/ is the test split
        assert kept.test is not None and len(kept.test) == len(src.val)


# -- benchmarks' JPEGs and the CLI ---------------------------------------------------------------------------
def test_imagenet_like_jpegs(tmp_path):
    root = make_imagenet_like(tmp_path / "inet", n=6, classes=3, size=(100, 75), val=3)
    files = sorted((root / "train").rglob("*.jpg"))
    assert len(files) == 6 and len(list((root / "val").rglob("*.jpg"))) == 3
    assert sorted(p.name for p in (root / "train").iterdir()) == ["class_000", "class_001", "class_002"]
    with Image.open(files[0]) as im:
        assert im.format == "JPEG" and im.size == (100, 75)
    src = discover(DataConfig(), root)
    assert src.class_names == ["class_000", "class_001", "class_002"]


def test_make_data_cli(tmp_path):
    from fasttrain.cli import main

    assert (
        main(["make-data", "drawing", str(tmp_path / "d"), "--sessions", "2", "--steps", "2", "--size", "24x16"]) == 0
    )
    src = discover(DataConfig(format="drawing"), tmp_path / "d")
    assert len(src.train) + len(src.val) == 4
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~mask  # not mkdtemp's 0700
    tool = [sys.executable, str(REPO / "tools" / "make_data.py")]  # the checkout wrapper, same parser
    again = subprocess.run(tool + ["paired", str(tmp_path / "d")], capture_output=True, text=True)
    assert again.returncode == 2 and again.stderr.startswith("fasttrain: error: ") and "already exists" in again.stderr


def test_a_folder_layout_that_leaves_images_out_or_splits_a_class_says_so(tmp_path, caplog):
    """Images beside the class folders, class folders differing only in case, and a validation split named
    validation/ were taken (or left out) without a word; a class whose every file fasttrain cannot read trained
    a one-class classifier that validated at 100%."""
    for cls in ("cat", "Cat", "fish"):
        for i in range(3):
            png(tmp_path / "train" / cls / f"{i}.png")
    png(tmp_path / "train" / "stray.png")
    png(tmp_path / "validation" / "cat" / "0.png")
    src = discover(DataConfig(), tmp_path)
    assert src.class_names == ["Cat", "cat", "fish"]
    assert "1 image directly in" in caplog.text and "in no class folder, is not used (stray.png)" in caplog.text
    assert "class folders Cat and cat in" in caplog.text and "differ only in case" in caplog.text
    assert "validation looks like a validation split, but data.val_dir is 'val': --set data.val_dir=validation" in (
        caplog.text
    )
    caplog.clear()
    assert discover(DataConfig(val_dir="validation"), tmp_path).val is not None
    assert "looks like a validation split" not in caplog.text
    discover(DataConfig(test_dir="validation"), tmp_path)  # the test split's folder: not offered as validation
    assert "looks like a validation split" not in caplog.text

    flat = tmp_path / "flat"  # no train/: the class folders at the root, and validation/ beside them
    for cls in ("cat", "fish"):
        png(flat / cls / "0.png")
        png(flat / "validation" / cls / "0.png")
    with pytest.raises(
        ConfigError, match=r"validation holds folders named like the classes \(cat, fish\): a validation"
    ):
        discover(DataConfig(), flat)  # it trained a third class, 'validation'
    assert discover(DataConfig(val_dir="validation"), flat).class_names == ["cat", "fish"]
    (flat / "validation").rename(flat / "val")  # val/ beside the class folders: it said "a class the training
    beside = discover(DataConfig(), flat)  # split lacks"
    assert beside.class_names == ["cat", "fish"] and len(beside.val) == 2 and len(beside.train) == 2

    phone = tmp_path / "phone"
    (phone / "fish").mkdir(parents=True)
    for i in range(4):
        png(phone / "cat" / f"{i}.png")
        (phone / "fish" / f"IMG_{i}.HEIC").write_bytes(b"\0\0\0\x18ftypheic")
    with pytest.raises(
        ConfigError,
        match=r"only cat/ holds images it can read \(fish: none; 4 files skipped in fish/, the first .*IMG_0.HEIC",
    ):
        discover(DataConfig(), phone)


def test_a_data_root_at_a_folder_of_images_points_to_the_folder_above(tmp_path):
    """It said only 'holds no class folders' of a folder holding a class's images."""
    for i in range(3):
        png(tmp_path / "photos" / "cat" / f"{i}.png")
    with pytest.raises(
        ConfigError, match=r"its 3 images lie in it directly: if it is one class's folder, data.root is"
    ):
        discover(DataConfig(), tmp_path / "photos" / "cat")


def test_a_data_root_pointing_at_one_class_folder_says_so(tmp_path):
    """It said 'found 1; set model.num_outputs', which is not what is wrong."""
    from tinyrun import tiny_cfg

    from fasttrain.runtime import Runtime
    from fasttrain.tasks import make_task

    for i in range(3):
        png(tmp_path / "cat" / "2023" / f"{i}.png")
    cfg = tiny_cfg(tmp_path / "cat", tmp_path / "runs")
    task = make_task(cfg, Runtime(cfg.runtime), discover(cfg.data))
    with pytest.raises(ValueError, match=r"has one class folder \(2023/\); .*is data.root one class's folder"):
        _ = task.num_outputs
