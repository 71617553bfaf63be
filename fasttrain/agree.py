"""Nodes agree or refuse: before a torchrun job's first step (and before it writes anything) every rank
checks what it is about to train on against rank 0's, and a difference ends the job with one message on every
rank naming what differs and where, instead of a job that hangs in mismatched collectives or trains on other
data on each node.

Compared: the dataset (:func:`dataset_fingerprint`: every discovered sample and target, by path under the
data root), the resolved config (``data.root`` aside: nodes may mount the data at other paths; the fingerprint
compares what lies under it), and the fasttrain and torch versions. The comparison and its message are pure
(:func:`differences`); :func:`check_nodes` gathers each rank's facts and raises :class:`NodesDisagree`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fasttrain.rundir import RunError

__all__ = ["Fingerprint", "NodeFacts", "NodesDisagree", "dataset_fingerprint", "differences", "check_nodes"]


class NodesDisagree(RunError):
    """The ranks of a job would not train on the same thing; the message names what differs and where."""


@dataclass(frozen=True)
class Fingerprint:
    """A dataset as discovered: a digest over every split's samples and targets, in order."""

    digest: str
    counts: dict[str, int]
    """Samples per split (train, val, test)."""
    folders: dict[str, tuple[int, str]] = field(default_factory=dict, compare=False)
    """Folder under the root (and the split, where the folder does not name it) -> (samples, digest): where two
    fingerprints differ."""

    def describe(self) -> str:
        return " / ".join(f"{n} {split}" for split, n in self.counts.items())


def _target(t: Any, root: str) -> str:
    if isinstance(t, str):  # a paired sample's target image
        return t[len(root) :] if t.startswith(root) else t
    if isinstance(t, (list, tuple)):
        return ",".join(repr(float(x)) for x in t)
    return repr(t)


def dataset_fingerprint(source: Any) -> Fingerprint:
    """A hash over the discovered train / val / test samples (paths relative to the data root) and their
    targets, with the class or target names; also per folder, to say where two nodes' data differ. One pass
    over the file lists, nothing opened."""
    root = str(source.root).rstrip("/") + "/"
    whole = hashlib.sha256()
    for names in (getattr(source, "class_names", None), getattr(source, "target_names", None)):
        whole.update(repr(list(names or [])).encode())
    counts: dict[str, int] = {}
    folders: dict[str, Any] = {}
    sizes: dict[str, int] = {}
    for split in (source.train, source.val, source.test):
        if split is None:
            continue
        counts[split.name] = len(split)
        whole.update(f"{split.name}:{len(split)}\n".encode())  # a dataset from Python lists no targets here
        for path, target in zip(split.paths, split.targets):
            rel = path[len(root) :] if path.startswith(root) else path
            line = f"{split.name}\t{rel}\t{_target(target, root)}\n".encode()
            whole.update(line)
            folder = os.path.dirname(rel) or "."
            key = folder if folder.split("/")[0] == split.name else f"{folder} ({split.name})"
            if key not in folders:
                folders[key], sizes[key] = hashlib.sha256(), 0
            folders[key].update(line)
            sizes[key] += 1
    return Fingerprint(whole.hexdigest()[:16], counts, {k: (sizes[k], h.hexdigest()[:16]) for k, h in folders.items()})


@dataclass(frozen=True)
class NodeFacts:
    """What one rank is about to train on."""

    rank: int
    node: int
    """torchrun's node rank (GROUP_RANK)."""
    host: str
    dataset: Fingerprint
    config: dict[str, Any]
    """The resolved config, flattened (section.key -> value), data.root left out."""
    versions: str

    def where(self) -> str:
        return f"rank {self.rank} (node {self.node}, host {self.host})"


def _flat(cfg: Any) -> dict[str, Any]:
    from fasttrain.config import config_to_dict

    out: dict[str, Any] = {}
    for section, values in config_to_dict(cfg).items():
        if isinstance(values, dict):
            out.update({f"{section}.{k}": v for k, v in values.items() if f"{section}.{k}" != "data.root"})
        else:
            out[section] = values
    return out


def node_facts(source: Any, cfg: Any, rank: int, env: Mapping[str, str] | None = None) -> NodeFacts:
    import torch

    from fasttrain import __version__

    env = os.environ if env is None else env
    return NodeFacts(
        rank,
        int(env.get("GROUP_RANK", "0") or 0),
        socket.gethostname(),
        dataset_fingerprint(source),
        _flat(cfg),
        f"fasttrain {__version__}, torch {torch.__version__}",
    )


def _folders(a: Fingerprint, b: Fingerprint, show: int = 3) -> str:
    """Where two fingerprints differ, by folder: ``train/cat (143 samples there, 150 on rank 0)``."""
    diff = []
    for key in sorted(set(a.folders) | set(b.folders)):
        x, y = a.folders.get(key, (0, "")), b.folders.get(key, (0, ""))
        if x != y:
            diff.append(f"{key} ({x[0]} samples there, {y[0]} on rank 0)" if x[0] != y[0] else f"{key} (other files)")
    if not diff:
        return ""
    more = f" and {len(diff) - show} more" if len(diff) > show else ""
    return "; differing folders: " + ", ".join(diff[:show]) + more


def differences(facts: list[NodeFacts], show: int = 4) -> list[str]:
    """What every rank's facts differ in from rank 0's, one clause per difference (empty: they agree). Pure."""
    ref = min(facts, key=lambda f: f.rank)
    out = []
    for f in sorted(facts, key=lambda f: f.rank):
        if f is ref:
            continue
        if f.dataset.digest != ref.dataset.digest:
            out.append(
                f"dataset: {f.where()} sees {f.dataset.describe()} samples (fingerprint {f.dataset.digest}), "
                f"{ref.where()} {ref.dataset.describe()} ({ref.dataset.digest}){_folders(f.dataset, ref.dataset)}"
            )
        keys = sorted(k for k in set(f.config) | set(ref.config) if f.config.get(k) != ref.config.get(k))
        if keys:
            shown = ", ".join(f"{k}={f.config.get(k)!r} (rank 0: {ref.config.get(k)!r})" for k in keys[:show])
            more = f" and {len(keys) - show} more" if len(keys) > show else ""
            out.append(f"config: {f.where()} has {shown}{more}")
        if f.versions != ref.versions:
            out.append(f"versions: {f.where()} runs {f.versions}, rank 0 {ref.versions}")
    return out


def message(diffs: list[str]) -> str:
    return (
        "the nodes of this job do not agree, so it stops before training (nothing was written): "
        + "; ".join(diffs)
        + ". Every node must see the same data (a shared or identical copy under data.root) and run the same "
        "config and versions"
    )


def check_nodes(source: Any, cfg: Any) -> None:
    """Under torchrun: every rank's facts gathered on every rank; :class:`NodesDisagree` (the same message on
    every rank) when any differs from rank 0's. One process: nothing to compare."""
    from fasttrain import distributed

    info = distributed.current()
    if not info.enabled:
        return
    timeout = float(getattr(getattr(cfg, "dist", None), "timeout_s", 1800.0))
    mine = node_facts(source, cfg, info.rank)
    small = dataclasses.replace(mine, dataset=Fingerprint(mine.dataset.digest, mine.dataset.counts))
    # Through the store, not the process group: a rank that stopped with an error on the way here is named at
    # once (whatever the backend), instead of the others waiting in a collective.
    gathered = distributed.gather("facts", small, timeout)
    if len({f.dataset.digest for f in gathered}) > 1:  # every rank knows: the folders go round too
        folders = distributed.gather("folders", mine.dataset.folders, timeout)
        gathered = [
            dataclasses.replace(f, dataset=Fingerprint(f.dataset.digest, f.dataset.counts, d))
            for f, d in zip(gathered, folders)
        ]
    diffs = differences(gathered)
    if diffs:
        raise NodesDisagree(message(diffs))
