"""Every backend over a folder of bad and awkward files (tests/badfiles.py): the good ones train and evaluate,
every bad one is in ``loader.skipped`` with a reason, a run on data that is not data stops with the list, and
nothing hangs (a FIFO named ``x.png`` used to block the torch loader, ``predict`` and check-data for ever)."""

from __future__ import annotations

import io
import os
import re
import signal
from pathlib import Path

import badfiles
import pytest
import torch

from fasttrain.config import Config, DataConfig
from fasttrain.data.base import InputSpec, LoaderRequest
from fasttrain.data.checks import BadDataError, check_data
from fasttrain.data.decode import load_image
from fasttrain.data.files import NotRegularFileError
from fasttrain.data.loaders import make_loader
from fasttrain.data.samples import Samples
from fasttrain.data.sources import Split, discover

# What each bad entry's reason says (the path names the file; the reason says why).
REASONS = {
    "empty.jpg": "empty file",
    "truncated.jpg": "truncated",
    "truncated.png": "truncated",
    "idat-not-zlib.png": "not a zlib stream",
    "corrupt-deflate.png": "decode",  # passes the pre-check: found when decoded (torch, cache) or by DALI
    "huge-header.jpg": "data.max_image_pixels",
    "bomb.png": "data.max_image_pixels",
    "fifo.png": "named pipe",
    "folder.jpg": "directory",
    "text.jpg": "not a JPEG",
    "dangling.jpg": "broken symbolic link",
}


def _dali_ok() -> bool:
    from fasttrain.data.dali import dali_status

    return dali_status()[0]


BACKENDS = [
    "torch",
    "torch-workers",
    "cache",
    pytest.param("dali", marks=pytest.mark.skipif(not _dali_ok(), reason="DALI cannot run here")),
]


@pytest.fixture(autouse=True)
def no_hang():
    """A guard only: anything that blocks (a FIFO opened for reading) fails the test instead of hanging the suite."""

    def timeout(signum, frame):
        raise TimeoutError("blocked for 120 s")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    return badfiles.write_png_bomb(tmp_path_factory.mktemp("bomb") / "bomb.png")


@pytest.fixture
def corpus(tmp_path, bomb) -> tuple[list[str], list[str]]:
    return badfiles.write_corpus(tmp_path / "corpus", bomb_cache=bomb)


def config(backend: str, **data) -> Config:
    return Config(
        data=DataConfig(
            image_size=16,
            workers=1 if backend == "torch-workers" else 0,
            dali_threads=1,
            loader=backend.split("-")[0],
            **data,
        )
    )


def spec(cfg: Config) -> InputSpec:
    mean, std = cfg.data.norm_mean_std()
    return InputSpec(torch.device("cpu"), torch.float32, False, tuple(mean), tuple(std))


def loader_for(backend: str, paths: list[str], *, train: bool, batch_size: int = 2, **data):
    cfg = config(backend, **data)
    split = Split("train" if train else "val", list(paths), list(range(len(paths))))
    request = LoaderRequest(Samples(split, "class"), train, batch_size)
    return make_loader(backend.split("-")[0], request, cfg, spec(cfg))


def assert_skipped_with_reasons(loader, bad: list[str]) -> None:
    skipped = dict(loader.skipped)
    assert sorted(skipped) == sorted(bad)
    assert isinstance(loader.skipped, list) and all(isinstance(s, tuple) and len(s) == 2 for s in loader.skipped)
    for path, why in skipped.items():
        assert REASONS[Path(path).name] in why, (path, why)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_trains_and_evaluates_the_good_files_and_lists_the_bad(corpus, backend):
    good, bad = corpus
    paths = sorted(good + bad)  # interleaved, as a folder lists them
    good_idx = {paths.index(p) for p in good}
    val = loader_for(backend, paths, train=False)
    targets = torch.cat([b.targets for b in val]).tolist()
    assert sorted(targets) == sorted(good_idx)  # every good file once, bad ones never
    assert_skipped_with_reasons(val, bad)
    train = loader_for(backend, paths, train=True)
    batches = list(train)
    # 6 files pass the pre-check: 3 whole batches, the one with the file that fails to decode topped up; the
    # cache decodes everything at construction, so its sampler sees the 5 good files only.
    assert [len(b) for b in batches] == [2] * (2 if backend == "cache" else 3)
    assert {t for b in batches for t in b.targets.tolist()} <= good_idx
    assert all(torch.isfinite(b.inputs).all() for b in batches)
    assert_skipped_with_reasons(train, bad)
    train.close()
    val.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_training_set_of_non_images_is_refused_at_construction(corpus, backend):
    _, bad = corpus
    caught_early = [p for p in bad if not p.endswith("corrupt-deflate.png")]
    with pytest.raises(BadDataError, match="no usable image in the train split") as err:
        loader_for(backend, caught_early, train=True)
    assert "check-data" in str(err.value) and caught_early[0] in str(err.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_training_set_that_never_decodes_is_refused_not_trained_at_zero_samples(tmp_path, backend):
    """Files that pass the pre-check and all fail to decode: the torch loader used to 'train' on nothing."""
    paths = [str(badfiles.write_png_corrupt_deflate(tmp_path / f"c{i}.png")) for i in range(4)]
    with pytest.raises(BadDataError, match="not one image of the train split") as err:
        loader = loader_for(backend, paths, train=True)
        list(loader)
    assert paths[0] in str(err.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_more_bad_files_in_an_epoch_than_allowed_stop_the_run_with_the_list(tmp_path, corpus, backend):
    good, _ = corpus
    broken = [str(badfiles.write_png_corrupt_deflate(tmp_path / f"c{i}.png")) for i in range(3)]
    with pytest.raises(BadDataError, match=r"data.max_bad_per_epoch = 2") as err:
        loader = loader_for(backend, good + broken, train=False, batch_size=8, max_bad_per_epoch=2)
        list(loader)
    assert all(p in str(err.value) for p in broken)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_jpeg_corrupt_mid_stream_is_skipped_by_every_backend_for_the_same_reason(tmp_path, backend):
    """Its header and end marker are intact, so the pre-check passes it; Pillow refuses it. DALI used to decode
    it anyway (8 skipped against 9 elsewhere, an unattributed "Corrupt JPEG data" on stderr): now Pillow
    judges such files for DALI too, and every backend names it with the same reason."""
    good = [str(badfiles.write_jpeg(tmp_path / f"g{i}.jpg", seed=i)) for i in range(3)]
    corrupt = str(badfiles.write_corrupt_mid_stream_jpeg(tmp_path / "corrupt.jpg"))
    loader = loader_for(backend, [*good, corrupt], train=False)
    targets = torch.cat([b.targets for b in loader]).tolist()
    loader.close()
    assert sorted(targets) == [0, 1, 2]
    assert loader.skipped == [(corrupt, "cannot be decoded (OSError: broken data stream when reading image file)")]


def test_jpeg_scan_check_passes_valid_files_and_flags_markers_inside_the_scan(tmp_path):
    from fasttrain.data.checks import jpeg_scan_suspect

    photo = badfiles._photo(3, 96, 120)
    kinds = {"baseline": {}, "progressive": {"progressive": True}, "restarts": {"restart_marker_blocks": 1}}
    for name, save in kinds.items():
        buf = io.BytesIO()
        photo.save(buf, format="JPEG", quality=90, **save)
        assert not jpeg_scan_suspect(buf.getvalue()), name
        assert not jpeg_scan_suspect(buf.getvalue() + b"trailing bytes \xff\x99"), name
    assert jpeg_scan_suspect(badfiles.write_corrupt_mid_stream_jpeg(tmp_path / "c.jpg").read_bytes())


def test_discovery_and_check_data_report_what_is_not_an_image(tmp_path, bomb):
    root = tmp_path / "data"
    good, bad = badfiles.write_corpus(root / "train" / "a", bomb_cache=bomb)
    badfiles.write_corpus(root / "train" / "b", bad={})
    (root / "train" / "empty-class").mkdir()
    src = discover(DataConfig(root=str(root), val_fraction=0.0))
    listed = set(src.train.paths)
    assert set(good) <= listed and not any(p in listed for p in bad if "fifo" in p or "dangling" in p)
    assert {Path(p).name for p, _ in src.skipped} == {"fifo.png", "dangling.jpg"}
    assert src.class_names == ["a", "b", "empty-class"]
    report = check_data(root, workers=2)
    reasons = {Path(p).name: why for p, why in report.bad}
    assert set(reasons) == {Path(p).name for p in bad} - {"folder.jpg"}  # a folder named x.jpg is a folder
    for name, why in reasons.items():
        assert REASONS[name] in why, (name, why)
    assert report.empty == [str(root / "train" / "a" / "folder.jpg"), str(root / "train" / "empty-class")]
    text = report.to_text()
    assert "EMPTY" in text and "empty-class" in text and "named pipe" in text


def test_images_of_formats_not_read_are_named_and_skipped_where_other_files_are_left_out_quietly(tmp_path, caplog):
    """A GIF or a phone's HEIC among the photos was dropped without a word ("0 skipped"): discovery (walked or from
    the dataset index's one walk), the index's report, check-data and predict on a folder now name them."""
    from fasttrain.data.index import describe, load_or_build
    from fasttrain.prediction import expand_images

    root = tmp_path / "data"
    good, _ = badfiles.write_corpus(root / "train" / "a", bad={})
    badfiles.write_corpus(root / "train" / "b", bad={})
    (root / "train" / "a" / "clip.GIF").write_bytes(b"GIF89a" + bytes(40))
    (root / "train" / "b" / "IMG_0001.heic").write_bytes(bytes(64))
    (root / "train" / "b" / "notes.txt").write_text("mine")
    cfg = DataConfig(root=str(root), val_fraction=0.0)
    foreign = {"clip.GIF": "GIF images are not read", "IMG_0001.heic": "HEIC images are not read"}
    src = discover(cfg)
    assert {Path(p).name: why.split(" (")[0] for p, why in src.skipped} == foreign
    assert not any(p.endswith((".GIF", ".heic", ".txt")) for p in src.train.paths)
    indexed = load_or_build(cfg)  # discovery given the index build's one walk
    assert {Path(p).name for p, _ in indexed.index.source().skipped} == set(foreign)
    assert "2 skipped at discovery" in describe(indexed)
    assert {Path(p).name for p, _ in check_data(root).bad} == set(foreign)
    files, errors = expand_images([root / "train" / "b"])
    assert [Path(e["image"]).name for e in errors] == ["IMG_0001.heic"] and len(files) == len(good)


def test_check_data_says_what_training_would_refuse_of_the_layout_as_a_note(tmp_path, capsys):
    """A flat folder, one class, a val class that train/ lacks: check-data passed them all; training refuses
    them. They are a note (LAYOUT), not a verdict: the folder may be another format's, or images to predict."""
    from fasttrain.cli import main

    flat = tmp_path / "flat"
    badfiles.write_corpus(flat, bad={})
    one = tmp_path / "one"
    badfiles.write_corpus(one / "train" / "cat", bad={})
    extra = tmp_path / "extra"
    badfiles.write_corpus(extra / "train" / "cat", bad={})
    badfiles.write_corpus(extra / "train" / "fish", bad={})
    badfiles.write_corpus(extra / "val" / "dog", bad={})
    for root, said in [
        (flat, f"holds no class folders (expected {flat}/<class>/<image>)"),
        (one, "one class folder (cat): a classifier needs at least 2 classes"),
        (extra, "has class folder 'dog' that the training split lacks"),
    ]:
        assert main(["check-data", str(root)]) == 0
        out, err = capsys.readouterr()
        assert "LAYOUT  as class folders (data.format = folder), training refuses it: " in out and said in out
        assert not err  # discovery's own lines are not repeated
    assert check_data(extra.parent / "extra" / "train").layout == ""


def test_a_file_link_loop_named_like_an_image_is_skipped_by_name_and_a_folder_loop_walked_once(tmp_path):
    """``a.jpg -> a-partner.jpg -> a.jpg`` used to stop discovery and check-data ("Too many levels of symbolic
    links" out of DirEntry.is_dir()); a folder link to its parent lists the class's files once."""
    root = tmp_path / "data"
    for c in ("a", "b"):
        for i in range(2):
            badfiles.write_jpeg((root / c).mkdir(parents=True, exist_ok=True) or root / c / f"{i}.jpg", seed=i)
    badfiles.write_link_loop(root / "a" / "loop.jpg")
    badfiles.write_folder_loop(root / "b" / "up")
    badfiles.write_folder_loop(root / "up")  # a "class folder" that is the dataset again
    src = discover(DataConfig(root=str(root), val_fraction=0.0))
    assert src.class_names == ["a", "b"]
    assert sorted(Path(p).relative_to(root).as_posix() for p in src.train.paths) == [
        "a/0.jpg",
        "a/1.jpg",
        "b/0.jpg",
        "b/1.jpg",
    ]
    skipped = dict(src.skipped)
    assert set(skipped) == {str(root / "a" / "loop.jpg"), str(root / "a" / "loop-partner.jpg")}
    assert all("Too many levels of symbolic links" in why for why in skipped.values())
    report = check_data(root, workers=1)
    assert report.total == 6 and len(report.bad) == 2 and not report.empty
    assert "loop.jpg: cannot be read (Too many levels of symbolic links)" in report.to_text()


def test_check_data_cli_on_the_corpus(tmp_path, bomb, capsys):
    from fasttrain.cli import main

    badfiles.write_corpus(tmp_path / "data" / "c", bomb_cache=bomb)
    assert main(["check-data", str(tmp_path / "data")]) == 1
    out = capsys.readouterr().out
    assert "fifo.png: not a regular file: a named pipe (FIFO)" in out and "10 unreadable" in out


def test_load_image_names_a_fifo_instead_of_blocking(tmp_path):
    """predict decodes with load_image: a FIFO is an error it reports, not a hang."""
    fifo = badfiles.write_fifo(tmp_path / "x.png")
    with pytest.raises(NotRegularFileError, match="named pipe"):
        load_image(str(fifo), 3)
    with pytest.raises(NotRegularFileError, match="broken symbolic link"):
        load_image(str(badfiles.write_dangling_symlink(tmp_path / "y.jpg")), 3)


def test_predict_reports_a_fifo_and_goes_on(tmp_path):
    from fasttrain.data import synthetic
    from fasttrain.engine import train
    from fasttrain.prediction import predict

    root = synthetic.make_shapes_dataset(
        tmp_path / "data", train_per_class=4, val_per_class=1, size=16, shapes=("circle", "square")
    )
    cfg = Config(data=DataConfig(root=str(root), image_size=16, workers=0, loader="torch"))
    cfg.train.epochs, cfg.train.max_steps, cfg.train.batch_size, cfg.train.runs_dir = 1, 1, 4, str(tmp_path / "r")
    cfg.model.name = "mlp"
    run = train(cfg, progress=False)
    image = next(root.rglob("*.png"))
    fifo = badfiles.write_fifo(tmp_path / "pipe.png")
    records = predict(run.run_dir / "checkpoints" / "last.pt", [str(fifo), str(image)], device="cpu")
    assert "named pipe" in records[0]["error"] and "error" not in records[1]


def test_train_on_unreadable_data_exits_with_the_list_not_a_traceback(tmp_path, corpus, capsys):
    from fasttrain.cli import main

    _, bad = corpus
    for cls in ("a", "b"):
        badfiles.write_corpus(
            tmp_path / "data" / "train" / cls,
            bad={"text.jpg": badfiles.write_text, "empty.png": badfiles.write_empty},
            good={},
        )
    code = main(
        [
            "train",
            "--set",
            f"data.root={tmp_path / 'data'}",
            "--set",
            "data.loader=torch",
            "--set",
            "data.workers=0",
            "--set",
            f"train.runs_dir={tmp_path / 'runs'}",
            "-q",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "no usable image in the train split" in err and "text.jpg" in err
    assert "Traceback" not in err


# -- everything at once, through the command line ---------------------------------------------------------------
def _manifest(root: Path) -> dict[str, tuple]:
    """What the user owns under ``root``, entry by entry, links not followed: kind, bytes' sha256 or link target,
    mode and modification time (a folder's changes when anything is created or removed in it, temp files too)."""
    import hashlib
    import stat

    out: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files, "."]:
            p = Path(folder) / name
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                what = ("link", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                what = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                what = (stat.filemode(st.st_mode)[0], None)  # folder, FIFO: never opened
            out[str(p.relative_to(root))] = (*what, st.st_mode, st.st_mtime_ns)
    return out


@pytest.fixture
def hostile_tree(tmp_path, bomb) -> tuple[Path, Path, set[str]]:
    """A shapes dataset holding every bad kind: the corpus, a file link loop and a corrupt-mid-stream JPEG named
    like images, folder link loops, a manifest-named link to a file outside.
    Returns (root, the outside file, names of the image-named entries every backend must skip)."""
    from fasttrain.data.synthetic import make_shapes_dataset

    root = make_shapes_dataset(
        tmp_path / "data", train_per_class=24, val_per_class=6, size=32, shapes=("circle", "square")
    )
    _, bad = badfiles.write_corpus(root / "train" / "circle", good={}, bomb_cache=bomb)
    badfiles.write_link_loop(root / "train" / "circle" / "loop.jpg")
    badfiles.write_corrupt_mid_stream_jpeg(root / "train" / "square" / "corrupt-mid-stream.jpg")
    badfiles.write_folder_loop(root / "train" / "square" / "up")
    badfiles.write_folder_loop(root / "val" / "circle" / "up")
    badfiles.write_folder_loop(root / "train" / "up")
    secret = tmp_path / "secret.csv"
    secret.write_text("hunter2,topsecret\n")
    (root / "labels.csv").symlink_to(secret)
    skipped = {Path(p).name for p in bad} - {"folder.jpg"} | {"loop.jpg", "loop-partner.jpg", "corrupt-mid-stream.jpg"}
    return root, secret, skipped


@pytest.mark.parametrize("backend", ["torch", "cache", pytest.param("dali", marks=BACKENDS[-1].marks)])
def test_check_data_and_train_finish_on_a_hostile_tree_and_change_nothing_of_it(
    hostile_tree, tmp_path, backend, capsys
):
    from fasttrain.cli import main

    root, secret, must_skip = hostile_tree
    before = _manifest(root), secret.read_bytes()
    assert main(["check-data", str(root)]) == 1  # it finishes, and says the tree holds bad files
    out = capsys.readouterr().out
    for name in must_skip:
        assert f"{os.sep}{name}: " in out, name
    runs = tmp_path / "runs"
    argv = ["train", "--set", f"data.root={root}", "--set", f"train.runs_dir={runs}", "--set", f"data.loader={backend}"]
    for setting in ("data.image_size=32", "data.resize_size=32", "data.workers=0", "data.dali_threads=1",
                    "model.name=smallcnn", "model.width=8", "train.epochs=1", "train.batch_size=8",
                    "train.max_steps=2", "data.max_bad_per_epoch=20", "runtime.device=cpu"):  # fmt: skip
        argv += ["--set", setting]
    assert main([*argv, "-q"]) == 0, capsys.readouterr().err
    (run,) = runs.iterdir()
    log = (run / "train.log").read_text()
    named = {Path(p).name for p in re.findall(r"skipp\w* (\S+?): ", log)}
    assert must_skip - {"corrupt-deflate.png"} <= named, must_skip - named  # found at construction, named
    assert "corrupt-mid-stream.jpg" in named  # every backend: the same rule
    assert (_manifest(root), secret.read_bytes()) == before
