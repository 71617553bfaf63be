"""The one backend policy and the one way to build a loader, the same for every task and every kind of sample.

``data.loader`` names a :class:`~fasttrain.data.base.Backend` of the ``backends`` table of
:mod:`fasttrain.registry` (its module's ``BACKEND`` object), or ``auto``. :func:`choose_backend` asks the backends
themselves: an explicit name runs when that backend serves the run's samples here (else a ConfigError names the
ones that do); ``auto`` tries them from the highest ``rank`` down and takes the first that serves the samples
and fits them, and says why each one above it was passed over. Today that is the GPU-resident cache when the
decoded dataset fits its budget (no per-step CPU work at all), else DALI where it imports (GPU decode on CUDA,
its CPU-only mode without a GPU), else the torch loader. A dataset from Python is samples of the kind
``dataset``, which only the backends that take tensors serve.

:func:`make_loader` builds one :class:`~fasttrain.data.base.LoaderRequest` on the named backend.
"""

from __future__ import annotations

import logging

import torch

from fasttrain import registry
from fasttrain.config import Config, ConfigError
from fasttrain.data.base import Backend, InputSpec, Loader, LoaderRequest, RunSamples

log = logging.getLogger(__name__)

__all__ = ["backend", "backends", "choose_backend", "make_loader"]


def backend(name: str) -> Backend:
    """The backend ``data.loader = name`` stands for; a ConfigError names the setting and the known names."""
    try:
        return registry.resolve("backends", name)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def backends() -> list[tuple[str, Backend]]:
    """Every registered backend, in registration order."""
    return [(name, backend(name)) for name in registry.names("backends")]


def choose_backend(
    requested: str,
    run: RunSamples,
    cfg: Config,
    device: torch.device | str | None = None,
    memory_limit: int | None = None,
) -> tuple[str, str]:
    """(backend, reason) for ``data.loader = requested`` over the run's samples. ``device``: where the run
    trains (None: CUDA when present, as ``runtime.device = auto``); ``memory_limit``: device bytes the run may
    use when smaller than the card (autotune's budget). Raises ConfigError where an explicit choice cannot run
    here, or where no backend can."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if requested != registry.AUTO:
        return requested, _as_asked(requested, run, cfg, device, memory_limit)
    passed: list[str] = []  # why each backend ranked above the one taken was passed over
    ranked = sorted(((n, b) for n, b in backends() if b.rank is not None), key=lambda nb: -(nb[1].rank or 0))
    for name, b in ranked:
        ok, why = b.serves(run, cfg, device)
        if ok:
            ok, why = b.fits(run, cfg, device, memory_limit)
        if ok:
            return name, "auto: " + "; ".join(dict.fromkeys([*passed, why]))
        passed.append(why)
    raise ConfigError("data.loader = auto, but no backend serves this run: " + "; ".join(dict.fromkeys(passed)))


def _as_asked(name: str, run: RunSamples, cfg: Config, device: torch.device, memory_limit: int | None) -> str:
    """The reason for an explicit ``data.loader = name``: refused (naming the backends that could) when it does
    not serve the samples here; a warning when ``auto`` would not have taken it (the cache would not fit)."""
    ok, note = backend(name).serves(run, cfg, device)
    if not ok:
        others = [n for n, b in backends() if n != name and b.serves(run, cfg, device)[0]]
        instead = f"; set data.loader = {' or '.join([*others, registry.AUTO])} (now {name})" if others else ""
        raise ConfigError(f"data.loader = {name}, but {note}{instead}")
    fits, why = backend(name).fits(run, cfg, device, memory_limit)
    if not fits:
        log.warning("data.loader = %s although %s", name, why)
    return f"data.loader = {name}" + (f" ({note})" if note else "")


def make_loader(name: str, request: LoaderRequest, cfg: Config, spec: InputSpec) -> Loader:
    """A loader for ``request`` on the backend ``data.loader = name`` (a name of the ``backends`` table)."""
    return backend(name).build(request, cfg, spec)
