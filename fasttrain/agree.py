"""Nodes agree or refuse: before a torchrun job's first step (and before it writes anything) every rank
checks what it is about to train on against rank 0's, and a difference ends the job with one message on every
rank naming what differs and where, instead of a job that hangs in mismatched collectives or trains on other
data on each node.

Compared: the dataset (:func:`dataset_fingerprint`: every discovered sample and target, by path under the
data root), the resolved config (``data.root`` and ``train.runs_dir`` aside: nodes may mount the data at other
paths and write elsewhere; the fingerprint
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

__all__ = [
    "Fingerprint",
    "NodeFacts",
    "NodesDisagree",
    "dataset_fingerprint",
    "differences",
    "check_nodes",
    "check_loaders",
]


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
    commit: str = ""
    """fasttrain's git commit where it runs from a checkout ("" where unknown: a wheel, git too slow)."""

    def where(self) -> str:
        return f"rank {self.rank} (node {self.node}, host {self.host})"


NODE_LOCAL = ("data.root", "train.runs_dir")
"""Settings each node may give its own value: where it mounts the data, and where it writes (rank 0 writes the
run; a rank that does not see rank 0's checkpoint is sent it)."""


def _flat(cfg: Any) -> dict[str, Any]:
    from fasttrain.config import config_to_dict

    out: dict[str, Any] = {}
    for section, values in config_to_dict(cfg).items():
        if isinstance(values, dict):
            out.update({f"{section}.{k}": v for k, v in values.items() if f"{section}.{k}" not in NODE_LOCAL})
        else:
            out[section] = values
    return out


def _commit() -> str:
    """fasttrain's commit where it runs from a git checkout (nodes on other code under one version string
    trained together), without "+dirty" (a node's local state, not other code); "" where unknown."""
    from fasttrain.rundir import git_commit

    return (git_commit() or "").removesuffix("+dirty")


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
        _commit(),
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
        elif f.commit and ref.commit and f.commit != ref.commit:  # compared where both are known
            out.append(f"code: {f.where()} runs fasttrain's commit {f.commit[:12]}, rank 0 {ref.commit[:12]}")
    return out


def message(diffs: list[str]) -> str:
    return (
        "the nodes of this job do not agree, so it stops before training (nothing was written): "
        + "; ".join(diffs)
        + ". Every node must see the same data (a shared or identical copy under data.root) and run the same "
        "config and versions"
    )


MAX_FOLDERS = 10_000
"""Folder entries one rank sends at most to say where the nodes' data differ (a store value holds 8 MiB)."""
MAX_FOLDER_BYTES = 2 << 20
"""And their names' bytes at most."""


def _split_key(key: str) -> tuple[list[str], str]:
    folder, sep, split = key.partition(" (")
    return folder.split("/"), sep + split


def folder_sizes(folders: dict[str, Any]) -> list[tuple[int, int]]:
    """(entries, bytes of their names) the folders make when cut to depth 1, 2, ... (the last: uncut)."""
    deepest = max((len(_split_key(k)[0]) for k in folders), default=1)
    out = []
    for depth in range(1, deepest + 1):
        keys = {_cut(k, depth) for k in folders}
        out.append((len(keys), sum(len(k) for k in keys)))
    return out


def choose_depth(sizes: list[list[tuple[int, int]]]) -> int:
    """The deepest cut every rank's folders fit :data:`MAX_FOLDERS` and :data:`MAX_FOLDER_BYTES` at (given every
    rank's :func:`folder_sizes`): 0 for groups by hash where even the top folders are too many."""
    depth = 0
    for d in range(1, max(len(s) for s in sizes) + 1):
        at = [s[min(d, len(s)) - 1] for s in sizes if s]
        if all(n <= MAX_FOLDERS and b <= MAX_FOLDER_BYTES for n, b in at):
            depth = d
        else:
            break
    return depth


def _cut(key: str, depth: int) -> str:
    parts, split = _split_key(key)
    if depth <= 0:
        group = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % MAX_FOLDERS
        return f"folder group {group} (of {MAX_FOLDERS} by name hash)"
    return "/".join(parts[:depth]) + ("/..." if len(parts) > depth else "") + split


def coarse_folders(folders: dict[str, tuple[int, str]], depth: int) -> dict[str, tuple[int, str]]:
    """``folders`` grouped by their first ``depth`` levels (see :func:`choose_depth`): samples summed, digests
    combined; unchanged where the cut leaves every folder whole."""
    groups: dict[str, list[tuple[str, int, str]]] = {}
    for key in sorted(folders):
        groups.setdefault(_cut(key, depth), []).append((key, *folders[key]))
    out = {}
    for group, members in groups.items():
        if len(members) == 1 and members[0][0] == group:
            out[group] = folders[group]
            continue
        digest = hashlib.sha256(repr(members).encode()).hexdigest()[:16]
        out[group] = (sum(n for _, n, _ in members), digest)
    return out


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
        # bounded (a store value holds 8 MiB): by coarser folders, the same on every rank, where there are many
        depth = choose_depth(distributed.gather("folder-sizes", folder_sizes(mine.dataset.folders), timeout))
        folders = distributed.gather("folders", coarse_folders(mine.dataset.folders, depth), timeout)
        gathered = [
            dataclasses.replace(f, dataset=Fingerprint(f.dataset.digest, f.dataset.counts, d))
            for f, d in zip(gathered, folders)
        ]
    diffs = differences(gathered)
    if diffs:
        raise NodesDisagree(message(diffs))


def check_loaders(loader: Any, cfg: Any, val_loader: Any = None) -> None:
    """Under torchrun, once the loaders are built: every rank's training loader holds the same usable samples'
    count and batches (and its validation loader the same usable samples: the ranks would validate on other
    data). The files agree by name (:func:`check_nodes`) before any is read; a copy that differs in
    content (a shard cut short on one node, a file changed on one) is found only when read, and a rank that
    skipped other samples drew its shard of another order and another number of steps: the ranks trained on
    overlapping samples, then waited in a collective until dist.timeout_s. :class:`NodesDisagree` names them."""
    from fasttrain import distributed

    info = distributed.current()
    if not info.enabled:
        return
    timeout = float(getattr(getattr(cfg, "dist", None), "timeout_s", 1800.0))
    skipped = [*loader.skipped, *(val_loader.skipped if val_loader is not None else ())]
    val = val_loader.num_samples if val_loader is not None else 0
    mine = (distributed._where(), len(loader), loader.num_samples, val, len(skipped), skipped[:1])
    gathered = distributed.gather("loaders", mine, timeout)
    if len({(n, k, v) for _, n, k, v, _, _ in gathered}) == 1:
        return
    parts = []
    for who, batches, samples, val_samples, n_skipped, first in gathered:
        why = f": the first, {first[0][0]}: {first[0][1]}" if first else ""
        parts.append(
            f"{who} reads {samples} usable training samples in {batches} batches and {val_samples} validation "
            f"samples ({n_skipped} skipped{why})"
        )
    raise NodesDisagree(
        "the nodes of this job read different training data, so it stops before training (nothing was written): "
        + "; ".join(parts)
        + ". Their copies of data.root differ in content (a shard cut short, a file changed on one node): make "
        "them the same"
    )
