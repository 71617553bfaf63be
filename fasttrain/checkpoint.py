"""Checkpoints: everything a resumed run needs, written atomically, loadable with ``weights_only=True``.

A checkpoint holds the task state (modules, optimizers, scalers, schedulers, epoch, step), the RNG states,
the resolved config and what prediction needs (class names). It is written to a temp file in the same folder,
fsynced, then renamed over the old one, so a run killed mid-write, or stopped by a full disk, leaves the
previous checkpoint intact. Its layout is checked once on load (:class:`CheckpointError` names what is wrong),
and :func:`check_resume_config` names the settings a resumed run may not change.
"""

from __future__ import annotations

import codecs
import logging
import os
import pickle
import random
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fasttrain.config import Config, ConfigError, config_from_dict, config_to_dict
from fasttrain.io import WriteError, atomic_replace

log = logging.getLogger(__name__)

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "rng_state",
    "set_rng_state",
    "CheckpointError",
    "alternatives",
    "checkpoint_config",
    "check_resume_config",
    "RESUME_MAY_CHANGE",
    "finite_weights",
    "CheckpointManager",
    "ResumePoint",
]

FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint file is not usable; the message names the file and what is missing or wrong."""


def rng_state() -> dict[str, Any]:
    """RNG states as plain tensors / tuples (weights_only-safe: numpy's key array becomes a tensor)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(np.asarray(keys).astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        # Only where this process started CUDA: reading its generators starts it (a context on GPU 0 for a run on
        # the CPU of a GPU machine, at every checkpoint), and a process that never started it never drew there.
        # Its own GPU's alone (the runtime made it the current one): a rank resumed on another GPU of another
        # layout (2 nodes x 4 GPUs -> 1 x 8) takes its stream there.
        "cuda": [torch.cuda.get_rng_state()] if _cuda_started() else [],
    }
    return state


def _cuda_started() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if not cuda or not _cuda_started():  # a run on CUDA has started it by now (its model is there)
        return
    if len(cuda) == 1:
        torch.cuda.set_rng_state(cuda[0])  # this process's GPU's
    elif len(cuda) == torch.cuda.device_count():  # older checkpoints: every visible GPU's
        torch.cuda.set_rng_state_all(cuda)


def _is_rng(x: Any) -> bool:
    """Whether ``x`` looks like :func:`rng_state`'s record."""
    return isinstance(x, dict) and {"python", "numpy", "torch"} <= set(x)


def _tuples(x: Any) -> Any:
    """random.setstate needs tuples; a round trip through some loaders may give lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write atomically. A failed write (disk full, read-only) raises :class:`~fasttrain.io.WriteError`
    saying that the previous checkpoint at ``path`` is intact."""
    path = Path(path)

    def write(tmp: Path) -> None:
        # A Python file object, not a path: torch's own file writer loses the OS error (errno) of a full disk.
        crc = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(True)  # every record's CRC-32: what load checks damage against
        try:
            with open(tmp, "wb") as f:
                torch.save({"format": FORMAT, **payload}, f)
        finally:
            torch.serialization.set_crc32_options(crc)

    try:
        return atomic_replace(path, write)
    except WriteError as e:
        before = (
            f"the previous checkpoint {path} is intact"
            if path.exists()
            else "no earlier checkpoint of this name exists"
        )
        raise WriteError(
            f"cannot write checkpoint {path}: {e.reason}; {before}", e.errno, path=path, reason=e.reason
        ) from None


def finite_weights(modules: dict[str, torch.nn.Module]) -> bool:
    """Whether every floating-point parameter and buffer is finite (one device sync). A diverged run's NaN
    weights must not replace a good checkpoint."""
    flags = [
        torch.isfinite(t).all()
        for m in modules.values()
        for t in (*m.parameters(), *m.buffers())
        if t.is_floating_point() and t.numel()
    ]
    return bool(torch.stack(flags).all()) if flags else True


def _need(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise CheckpointError(
            f"checkpoint {path}: {what}; it was damaged or not written by fasttrain "
            f"(use another checkpoint, e.g. best.pt / last.pt of the run)"
        )


def _validate(ckpt: dict[str, Any], path: Path, resume: bool) -> None:
    """The layout every reader relies on, checked once so that readers can index it freely."""
    _need(isinstance(ckpt.get("config"), dict), path, "it has no 'config' table")
    state = ckpt.get("state")
    _need(isinstance(state, dict), path, "it has no 'state' (the weights)")
    assert isinstance(state, dict)
    _need(
        isinstance(state.get("modules"), dict)
        and state["modules"]
        and all(isinstance(v, dict) for v in state["modules"].values()),
        path,
        "its state has no 'modules' weights",
    )
    _need(
        isinstance(state.get("epoch", 0), int) and isinstance(state.get("step", 0), int),
        path,
        "its state's epoch / step are not integers",
    )
    meta = ckpt.get("meta")
    _need(meta is None or isinstance(meta, dict), path, "its 'meta' is not a table")
    cfg = checkpoint_config(ckpt, path)
    n = cfg.model.num_outputs
    for key in ("class_names", "target_names"):
        names = (meta or {}).get(key)
        if names is None:
            continue
        _need(
            isinstance(names, list) and all(isinstance(s, str) for s in names),
            path,
            f"its {key} are not a list of names",
        )
        _need(
            not n or len(names) == n,
            path,
            f"it has {len(names)} {key.replace('_', ' ')} for the model's {n} outputs (model.num_outputs)",
        )
    if resume:
        for group in ("optimizers", "scalers", "schedulers"):
            _need(isinstance(state.get(group), dict), path, f"its state has no '{group}' (a resume needs them)")
        _need("epoch" in state and "step" in state, path, "its state has no epoch / step (a resume needs them)")
        _need(_is_rng(ckpt.get("rng")), path, "it has no RNG states (a resume needs them)")
        pos = ckpt.get("position")
        _need(
            pos is None
            or (isinstance(pos, dict) and isinstance(pos.get("epoch"), int) and isinstance(pos.get("micro"), int)),
            path,
            "its 'position' is malformed",
        )
        running = ckpt.get("running")
        _need(running is None or isinstance(running, dict), path, "its 'running' sums are malformed")


def _not_torch_save(path: Path) -> str:
    """What ``path`` is when its first bytes are not torch.save's (a zip, or a legacy file's pickle), else "". An
    image or a config given where a checkpoint goes was refused as "pickled Python objects"."""
    from fasttrain.io import sniff_image_format

    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK") or head.startswith(b"\x80"):
        return ""
    image = sniff_image_format(head)
    if image:
        return f"it is a {image.upper()} image"
    if not head:
        return "it is empty"
    try:
        if b"\0" in head:  # a binary format whose header is text (safetensors: a length, then JSON)
            raise UnicodeDecodeError("utf-8", head, 0, 1, "NUL")
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < 64)  # one cut at byte 64 is text
    except UnicodeDecodeError:
        return "its first bytes are neither a zip's nor a pickle's (torch.save writes one of them)"
    return "it is a text file" + (
        " (a config: train with it, or give its run folder)" if path.suffix == ".toml" else ""
    )


def _damage(path: Path) -> str | None:
    """What is wrong with a checkpoint's bytes, or None. torch.save writes a zip whose every record carries a
    CRC-32 of its bytes; torch.load never checks them, so one flipped bit would load as different weights (or
    NaN two steps later). Reading the records back against their checksums costs one read of the file."""
    if not zipfile.is_zipfile(path):
        return None  # not a zip at all: torch.load says what it is
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        return f"its zip structure is broken: {e}"
    return f"record {bad} does not match its CRC-32 checksum" if bad else None


def _custom_model(config: Path) -> bool:
    """Whether the run config at ``config`` (if readable) trained a model given from Python."""
    import tomllib

    try:
        return tomllib.loads(config.read_text(encoding="utf-8")).get("model", {}).get("name") == "custom"
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, AttributeError):
        return False


def alternatives(path: str | os.PathLike, *, resume: bool = False) -> str:
    """ "; other checkpoints of this run: ..." naming the usable files beside ``path`` (best.pt, step
    checkpoints), with the command that resumes from one when ``resume``; or what else to do."""
    path = Path(path)
    others = sorted(
        (p for p in path.parent.glob("*.pt") if p.name != path.name and p.is_file()),
        key=lambda p: (p.name != "best.pt", -p.stat().st_mtime),
    )
    if not others:
        if resume:
            config = path.parent.parent / "config.toml"
            if _custom_model(config):  # its model came from Python: the command line cannot build it
                again = f"train(load_config('{config}'), model=...)"
                return f"; this run has no other checkpoint: start again from Python, {again}"
            return f"; this run has no other checkpoint: start again (fasttrain train {config})"
        return ""
    names = ", ".join(p.name for p in others)
    if resume:
        return f"; other checkpoints of this run: {names}; resume from one: fasttrain train --resume {others[0]}"
    return f"; other checkpoints of this run: {names} (in {path.parent})"


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", *, resume: bool = False
) -> dict[str, Any]:
    """Load and check a checkpoint. ``resume``: also require what continuing a run needs (optimizer, scaler,
    scheduler and RNG states). Raises FileNotFoundError or :class:`CheckpointError`, naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: not found")
    other = _not_torch_save(path)
    if other:
        raise CheckpointError(f"checkpoint {path}: not a fasttrain checkpoint: {other}")
    damage = _damage(path)
    if damage is not None:
        raise CheckpointError(
            f"checkpoint {path} is damaged ({damage}) and is not used{alternatives(path, resume=resume)}"
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # torch's message goes on for lines and suggests weights_only=False
        named = re.search(r"GLOBAL (\S+)", str(e))
        what = f" ({named.group(1)})" if named else ""
        raise CheckpointError(
            f"checkpoint {path}: refused: it holds pickled Python objects{what}, which could run code when "
            f"loaded; fasttrain checkpoints hold only tensors and plain data: use one that `fasttrain train` wrote"
        ) from None
    except Exception as e:  # noqa: BLE001 - zip / format errors: say which file and why, on one line
        why = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"checkpoint {path}: cannot be loaded ({type(e).__name__}: {why})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = f"format {ckpt.get('format')!r}" if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}"
        raise CheckpointError(f"checkpoint {path}: not a fasttrain checkpoint ({found})")
    _validate(ckpt, path, resume)
    return ckpt


def checkpoint_config(ckpt: dict[str, Any], path: str | os.PathLike) -> Config:
    """The run's config stored in a checkpoint; :class:`CheckpointError` naming the file when it is not valid."""
    try:
        return config_from_dict(ckpt["config"], source=f"checkpoint {path}")
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {path}: its config is not valid: {e}") from None


RESUME_MAY_CHANGE = (
    "train.epochs",
    "train.total_steps",
    "train.log_every",
    "train.eval_every",
    "train.eval_batch_size",
    "train.checkpoint_every",
    "train.checkpoint_every_steps",
    "train.max_nonfinite_logs",
    "train.early_stop_patience",
    "train.early_stop_min_delta",
    "train.save_top_k",
    "train.runs_dir",
    "train.run_name",
    "runtime.*",
    "tune.*",
    "bench.*",
    "dist.*",
    "name",
    "data.root",
    "data.loader",
    "data.workers",
    "data.prefetch",
    "data.dali_threads",
    "data.hw_decoder_load",
    "data.cache_budget",
)
"""Settings ``--resume RUN --set ...`` may change: how long to train, how often to log, evaluate and checkpoint,
where and how fast things run (device, precision, compile, loader backend and workers), and where the dataset
lives (its classes must stay the same). Everything else (model.*, task.*, optim.*, schedule.*, the data's size,
channels, normalization, augmentation and split, the batch size, the best metric) defines the run: a changed
value either would not fit the saved weights or would be silently overridden by the saved optimizer and
scheduler states, so it is refused. Settings added later that describe the data's content or the run's
numbers belong to the refused group; the loader's speed and safety knobs (data.*) to this one."""

_RESUME_FIXED_DATA = {
    "format",
    "train_dir",
    "val_dir",
    "test_dir",
    "manifest",
    "target_columns",
    "val_fraction",
    "split_seed",
    "image_size",
    "resize_size",
    "eval_size",
    "progressive",
    "progressive_epochs",
    "progressive_step",
    "channels",
    "random_resized_crop",
    "crop_scale_min",
    "hflip",
    "flip_alternate",
    "translate",
    "rand_augment",
    "mean",
    "std",
    "max_samples",
}


def _may_change(key: str) -> bool:
    section, _, name = key.partition(".")
    if key in RESUME_MAY_CHANGE or f"{section}.*" in RESUME_MAY_CHANGE:
        return True
    # New data.* settings are loader knobs unless listed as the data's content above.
    return section == "data" and name not in _RESUME_FIXED_DATA


def check_resume_config(saved: Config, new: Config, path: str | os.PathLike) -> None:
    """Raise :class:`~fasttrain.config.ConfigError` naming every setting that differs between the checkpoint's
    config and the resumed one but may not change on resume (see :data:`RESUME_MAY_CHANGE`)."""
    a, b = config_to_dict(saved), config_to_dict(new)
    changed = []
    for section in a:
        if isinstance(a[section], dict):
            for k in sorted(set(a[section]) | set(b.get(section, {}))):
                old, cur = a[section].get(k), b.get(section, {}).get(k)
                if old != cur and not _may_change(f"{section}.{k}"):
                    changed.append(f"{section}.{k} ({old!r} -> {cur!r})")
        elif a[section] != b.get(section) and not _may_change(section):
            changed.append(section)
    if changed:
        raise ConfigError(
            f"--resume: {', '.join(changed)} cannot change on resume: the run in {path} was trained "
            f"with the first value. Start a new run for that (fasttrain train CONFIG --set ...); "
            f"a resume may change train.epochs, logging / evaluation / checkpoint intervals, "
            f"early stopping, train.save_top_k, runtime.*, data.root and the loader settings"
        )


@dataclass
class ResumePoint:
    """Where a resumed run goes on from: its best value so far and, for a mid-epoch checkpoint, the
    micro-batches of the current epoch already trained and that epoch's running sums."""

    best_value: float | None = None
    micro: int = 0
    running: dict[str, Any] | None = None
    order: str = ""
    """The training loader's :attr:`~fasttrain.data.base.Loader.order` when the checkpoint was taken."""
    own_rng: bool = True
    """This process's random streams were put back as they were (False: a process of a torchrun job whose
    checkpoint has no stream of its rank (another world size, or written before they were kept), which now holds
    rank 0's: the caller gives it its own)."""


class CheckpointManager:
    """What a checkpoint holds, in one place: the task state (modules, optimizers, scalers, schedulers, EMA,
    epoch, step), the RNG states, the resolved config, what prediction needs (``task.checkpoint_meta()``), the
    best value so far, and for a mid-epoch checkpoint the loader position and the epoch's running sums.

    ``last.pt`` is never replaced by non-finite weights (a diverged run keeps its last good state); ``best.pt``
    follows ``train.best_metric``. Only the main process writes (``enabled``); every process can restore, on
    any world size.
    """

    def __init__(
        self, run_dir: str | os.PathLike, *, cfg: Config, task: Any, state: Any, best_metric: str, enabled: bool = True
    ):
        self.dir = Path(run_dir) / "checkpoints"
        self.cfg, self.task, self.state = cfg, task, state
        self.best_metric = best_metric
        self.best_value: float | None = None
        self.weights = "ema" if getattr(state, "ema", None) else "raw"
        """Which weights predict uses from the next checkpoint: ``raw`` or ``ema`` (the moving average); with an
        EMA, whichever validated better at the last evaluation (the average until one has)."""
        self.best_weights = self.weights
        """``weights`` when best.pt was written."""
        self.enabled = enabled
        self.saved_at = "none yet"
        """What last.pt holds (for messages)."""
        self.monitors: dict[str, Any] = {}
        """Objects with ``state_dict`` / ``load_state_dict`` whose state every checkpoint carries (early
        stopping's count, the top-k list: :mod:`fasttrain.monitor`)."""

    @property
    def last(self) -> Path:
        return self.dir / "last.pt"

    def payload(
        self,
        position: dict[str, Any] | None = None,
        running: dict[str, Any] | None = None,
        rngs: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """``position``: ``{"epoch", "micro", "order"}`` inside an unfinished epoch; ``running``: that epoch's
        sums; ``rngs``: every process's random streams, rank by rank (:meth:`rng_states`), kept under torchrun
        as ``rng_ranks`` beside rank 0's ``rng``."""
        rngs = rngs or [rng_state()]
        return {
            "state": self.state.state_dict(),
            "rng": rngs[0],
            **({"rng_ranks": rngs} if len(rngs) > 1 else {}),
            "config": config_to_dict(self.cfg),
            "meta": self.task.checkpoint_meta(),
            "best_metric": self.best_metric,
            "best_value": self.best_value,
            "weights": self.weights,
            "best_weights": self.best_weights,
            "position": position,
            "running": running,
            "monitors": {k: m.state_dict() for k, m in self.monitors.items()},
        }

    @staticmethod
    def rng_states() -> list[dict[str, Any]]:
        """Every process's random streams, rank by rank: under torchrun an object all-gather, which every process
        must call at the same point. :meth:`save_last` and :meth:`save_best` call it themselves unless given its
        answer: the top-k copies are decided on rank 0 alone, so the epoch's end gathers once for all its saves."""
        from fasttrain import distributed

        return distributed.all_gather_object(rng_state())

    def save_last(
        self,
        position: dict[str, Any] | None = None,
        running: dict[str, Any] | None = None,
        rngs: list[dict[str, Any]] | None = None,
    ) -> bool:
        """Write last.pt unless the weights went non-finite; returns whether it was written. Every process calls
        it together unless ``rngs`` (:meth:`rng_states`) is given."""
        rngs = rngs or self.rng_states()  # before anything a rank decides alone
        if not finite_weights(self.state.modules):
            log.warning(
                "not writing %s at step %d: the weights are not finite; it keeps %s",
                self.last,
                self.state.step,
                self.saved_at,
            )
            return False
        if self.enabled:
            save_checkpoint(self.last, self.payload(position, running, rngs))
        self.saved_at = f"epoch {self.state.epoch}, step {self.state.step}"
        return True

    def save_best(self, name: str = "best.pt", rngs: list[dict[str, Any]] | None = None) -> None:
        """Write best.pt (or a top-k copy, ``name``). Every process calls it together unless ``rngs`` is given."""
        rngs = rngs or self.rng_states()
        if name == "best.pt":
            self.best_weights = self.weights
        if self.enabled:
            save_checkpoint(self.dir / name, self.payload(rngs=rngs))

    def restore(self, ckpt: dict[str, Any]) -> ResumePoint:
        """Load ``ckpt`` (from :func:`load_checkpoint` with ``resume=True``) into the state and the RNGs."""
        try:
            self.state.load_state_dict(ckpt["state"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(
                f"checkpoint {self.last}: its state does not fit this run's model and "
                f"optimizers ({str(e).splitlines()[0]})"
            ) from None
        from fasttrain import distributed

        info = distributed.current()
        ranks = ckpt.get("rng_ranks")
        kept = isinstance(ranks, list) and len(ranks) == info.world_size and all(map(_is_rng, ranks))
        own = info.world_size == 1 or kept
        set_rng_state(ranks[info.rank] if kept and ranks else ckpt["rng"])
        self.best_value = ckpt.get("best_value")
        saved = ckpt.get("monitors")
        for k, m in self.monitors.items():
            if isinstance(saved, dict) and isinstance(saved.get(k), dict):
                try:
                    m.load_state_dict(saved[k])
                except (KeyError, TypeError, ValueError) as e:
                    log.warning("checkpoint %s: its %s state is malformed (%s); starting it afresh", self.last, k, e)
        if self.state.ema and ckpt["state"].get("ema"):  # else: the defaults (EMA turned on or off at resume)
            self.weights = ckpt.get("weights") or "ema"
            self.best_weights = ckpt.get("best_weights") or "ema"
        self.saved_at = f"epoch {self.state.epoch}, step {self.state.step}"
        position = ckpt.get("position")
        if position and position["epoch"] == self.state.epoch:
            micro, running, order = int(position["micro"]), ckpt.get("running"), position.get("order", "")
            return ResumePoint(self.best_value, micro, running, order, own_rng=own)
        return ResumePoint(self.best_value, own_rng=own)
