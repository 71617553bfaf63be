"""What autotune hands back: the typed report, its table, JSON (round-trips through the dataclasses), the PNG
and the tuned TOML config. The input config file is never touched, and no file is overwritten."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from fasttrain.config import Config, dump_config
from fasttrain.io import write_new, write_new_text
from fasttrain.memory import GIB
from fasttrain.tuning.loader import LoaderResult
from fasttrain.tuning.probe import Budget, SizeRate, Verification
from fasttrain.tuning.search import BatchPlan, Candidate, Skipped, beats

__all__ = ["AutotuneReport", "plot_report", "tuned_config", "tuned_toml", "write_outputs", "fits_label"]


@dataclass
class AutotuneReport:
    config_name: str
    model: str
    task: str
    device: str
    runtime: str
    """Runtime.describe() of the configured run (precision, channels_last, compile)."""
    input_shape: list[int]
    """C, H, W of the largest input."""
    budget: Budget
    headroom: float
    noise: float
    multiple: int
    max_batch: int = 0
    """The largest batch size the search could probe (tune.max_batch, or the training set's size)."""
    time_budget_s: float = 0.0
    candidates: list[Candidate] = field(default_factory=list)
    chosen_batch: int | None = None
    best_batch: int | None = None
    given_batch: int | None = None
    """The config's own micro-batch (probed first: the baseline)."""
    stop_reason: str = ""
    limit: str = ""
    """What ended the search: cap, time, memory, plateau, drop or none."""
    not_probed: list[Skipped] = field(default_factory=list)
    probe_mode: str = ""
    """How compile was handled (eager search + one compiled check, or eager throughout)."""
    compiled: Candidate | None = None
    """The compiled check that the plan uses (None when compile is off or nothing compiled fit)."""
    compiled_tried: list[Candidate] = field(default_factory=list)
    """Every compiled check, failed ones included."""
    plan: BatchPlan | None = None
    loader: LoaderResult | None = None
    verify: Verification | None = None
    tuned_values: dict[str, Any] = field(default_factory=dict)
    """section.key -> value written into the tuned config."""
    files: dict[str, str] = field(default_factory=dict)
    """config, json, plot -> path."""
    cached: bool = False
    cache_path: str = ""
    elapsed_s: float = 0.0
    """Wall time of this call."""
    compile_s: float = 0.0
    """Of which the compiled checks' warm-up (compilation) took about this long (not charged to the budget)."""
    error: str = ""
    notes: list[str] = field(default_factory=list)
    unreliable: list[str] = field(default_factory=list)
    """Why this answer is not trusted enough to cache (noisy probes, the machine's speed changed)."""
    environment: dict[str, Any] = field(default_factory=dict)
    world_size: int = 1
    """Processes of the torchrun job the answer is for: every batch here is per GPU, the tuned config's
    train.batch_size is the global batch (per-GPU x world_size)."""
    shortcut: str = ""
    """What a short CPU job left out: too-short (not tuned at all: the job cannot repay tuning), cap-spent (the
    time cap was spent with the config's own batch standing: no loader trials, no verification) or unconfirmed
    (a change time no longer allowed to confirm end to end gave way to the config's own); empty otherwise."""
    cpu_cap_s: float | None = None
    """The time budget on CPU from the job's length, when it was below tune.time_budget_s."""
    loader_by_length: bool = False
    """``data.loader = auto`` took another backend than a job of unbounded length would: the GPU cache was
    passed over because this job reads fewer images than the cache decodes before its first step."""
    size_rates: list[SizeRate] = field(default_factory=list)
    """Progressive resizing: the training step's samples/s at each training size, at the chosen micro-batch
    (memory is planned at the largest, which the candidates above were probed at)."""

    @property
    def ok(self) -> bool:
        """A choice was made, nothing failed, and the verification (when run) agrees or its difference is
        explained."""
        verified = self.verify is None or self.verify.ok
        return not self.error and self.chosen_batch is not None and self.plan is not None and verified

    @property
    def reliable(self) -> bool:
        return not self.unreliable

    @property
    def job_bound(self) -> bool:
        """The answer depends on the job's length (a CPU time cap or shortcut, or the loader ``auto`` chose for
        it), which the cache key leaves out."""
        return bool(self.shortcut) or self.cpu_cap_s is not None or self.loader_by_length

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("candidates", "compiled_tried", "not_probed", "size_rates"):
                v = [dataclasses.asdict(x) for x in v]
            elif f.name == "loader":
                v = v.to_dict() if v is not None else None
            elif dataclasses.is_dataclass(v) and not isinstance(v, type):
                v = dataclasses.asdict(v)
            d[f.name] = v
        d["ok"], d["reliable"] = self.ok, self.reliable
        d["budget_text"] = self.budget.describe()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AutotuneReport:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["budget"] = Budget.from_dict(d["budget"])
        kw["candidates"] = [Candidate.from_dict(c) for c in d.get("candidates", [])]
        kw["compiled_tried"] = [Candidate.from_dict(c) for c in d.get("compiled_tried", [])]
        kw["not_probed"] = [Skipped(**s) for s in d.get("not_probed", [])]
        kw["size_rates"] = [SizeRate(**s) for s in d.get("size_rates", [])]
        kw["compiled"] = Candidate.from_dict(d["compiled"]) if d.get("compiled") else None
        kw["plan"] = BatchPlan.from_dict(d["plan"]) if d.get("plan") else None
        kw["loader"] = LoaderResult.from_dict(d["loader"]) if d.get("loader") else None
        kw["verify"] = Verification.from_dict(d["verify"]) if d.get("verify") else None
        return cls(**kw)

    # -- the table ------------------------------------------------------------------------------------------
    def __str__(self) -> str:  # print(bench(cfg)) shows the table, not the dataclass's every field
        return self.to_table()

    def to_table(self) -> str:
        c_, h, w = self.input_shape
        lines = [
            f"fasttrain autotune {self.config_name}: {self.model} ({self.task}) {c_}x{h}x{w}, {self.runtime}"
            + (" [cached]" if self.cached else ""),
            f"budget: {self.budget.describe()}",
        ]
        if self.candidates or self.compiled_tried or self.not_probed:
            lines += self._candidate_lines()
            lines.append(f"search: {self.stop_reason}")
            lines.append(f"compile: {self.probe_mode}")
        if self.error:
            lines.append(f"error: {self.error}")
        lines += self._choice_lines() + self._verify_lines()
        lines += [f"note: {n}" for n in self.notes]
        if self.unreliable:
            lines.append("unreliable (not cached): " + "; ".join(self.unreliable))
        if self.files:
            lines.append("written: " + ", ".join(self.files[k] for k in ("config", "json", "plot") if k in self.files))
        timing = f"{self.elapsed_s:.1f} s"
        if self.compile_s:
            timing += f" (of which compiling about {self.compile_s:.1f} s, not charged to the budget)"
        budget = ""
        if self.time_budget_s and not self.cached:  # a CPU cap (from the job's length) is the budget: its note says
            budget = f" of the {self.time_budget_s:.1f} s " + ("CPU cap" if self.cpu_cap_s else "tune.time_budget_s")
        lines.append(f"took {timing}{budget}" + (f"; from the cache {self.cache_path}" if self.cached else ""))
        return "\n".join(lines)

    def _candidate_lines(self) -> list[str]:
        """The table of probes: one row per size (not probed ones too), the compiled checks last."""
        cuda = any(c.peak_reserved_bytes is not None for c in [*self.candidates, *self.compiled_tried])
        if cuda:
            head = (
                f"{'batch':>7}{'samples/s':>13}{'±':>6}{'alloc GiB':>11}{'reserved':>10}{'warm-up':>9}"
                f"{'retries':>9}  {'fits':<18}phase"
            )
        else:
            head = f"{'batch':>7}{'samples/s':>13}{'±':>6}{'RSS GiB':>11}  {'fits':<18}phase"
        lines = [head, "-" * max(len(head), 60)]
        rows: list[Candidate | Skipped] = sorted([*self.candidates, *self.not_probed], key=lambda c: c.batch_size)
        rows += self.compiled_tried
        for c in rows:
            if isinstance(c, Skipped):
                mem = f"{'-':>11}{'-':>10}{'-':>9}{'-':>9}" if cuda else f"{'-':>11}"
                lines.append(f"{c.batch_size:>7}{'-':>13}{'-':>6}{mem}  {c.describe():<18}{c.detail}")
                continue
            sps = "-" if c.samples_per_s is None else f"{c.samples_per_s:,.1f}"
            pm = "-" if c.samples_per_s is None else f"{100 * c.spread / 2:.0f}%"
            marks = []
            if c.batch_size == self.chosen_batch and c.phase != "compiled":
                marks.append("* chosen")
            if c.batch_size == self.given_batch and c.phase != "given" and c.phase != "compiled":
                marks.append("(given)")
            if not c.reliable:
                marks.append("unreliable")
            mark = ("  " + " ".join(marks)) if marks else ""
            if cuda:
                mem = (
                    f"{_gib(c.peak_allocated_bytes):>11}{_gib(c.peak_reserved_bytes):>10}"
                    f"{_gib(c.warmup_reserved_bytes):>9}{c.alloc_retries:>9}"
                )
            else:
                mem = f"{_gib(c.peak_rss_bytes):>11}"
            lines.append(f"{c.batch_size:>7}{sps:>13}{pm:>6}{mem}  {fits_label(c):<18}{c.phase}{mark}")
        lines.append("")
        if cuda:
            lines.append(
                "memory: steady-state peaks (statistics reset after the warm-up); 'warm-up' is the warm-up's "
                "peak reserved, cuDNN's algorithm search included, shown but not charged"
            )
        return lines

    def _choice_lines(self) -> list[str]:
        """The chosen batch against the best, the plan, the loader."""
        lines = []
        by = {c.batch_size: c for c in self.candidates}
        if self.chosen_batch is not None and self.chosen_batch in by:
            ch = by[self.chosen_batch]
            best = by.get(self.best_batch) if self.best_batch is not None else None
            text = f"chosen batch {self.chosen_batch}: {ch.samples_per_s:,.1f} samples/s"
            if best is not None and best.batch_size != ch.batch_size and not beats(best, ch, self.noise):
                why = "the config's own batch" if self.chosen_batch == self.given_batch else "the smaller batch"
                text += f" (best {best.samples_per_s:,.1f} at {best.batch_size}: within the noise, so {why} is kept)"
            elif best is not None and best.batch_size != ch.batch_size:  # the plan's note says why (verification)
                text += f" (the search's best, {best.samples_per_s:,.1f} at {best.batch_size}, was not kept: see below)"
            lines.append(text)
        if self.plan:
            p = self.plan
            if self.world_size > 1:  # the plan is per process: the tuned config's train.batch_size is below
                note = p.note.replace("train.batch_size", "the per-process batch")
                lines.append(f"per process: batch {p.global_batch} = {p.accumulation} x {p.micro_batch}: {note}")
            else:
                lines.append(f"train: batch_size {p.global_batch} = {p.accumulation} x {p.micro_batch}: {p.note}")
            if self.world_size > 1:
                lines.append(
                    f"torchrun: {self.world_size} processes, so the global batch is {self.world_size} x "
                    f"{p.global_batch} = {self.world_size * p.global_batch} (train.batch_size in the tuned "
                    f"config); the figures above are per GPU"
                )
        if self.loader:
            lines.append(f"loader ({self.loader.backend}): {self.loader.note}")
        if self.size_rates:
            largest = max(r.size for r in self.size_rates)
            lines.append(
                f"progressive resizing: memory planned at the largest size ({largest} px); samples/s per training "
                f"size at batch {self.size_rates[0].batch_size} (a few eager steps each): "
                + ", ".join(f"{r.size} px {r.samples_per_s:,.1f}" for r in self.size_rates)
            )
        return lines

    def _verify_lines(self) -> list[str]:
        v = self.verify
        if v is None:
            return []
        lines = []
        if v.samples_per_s is not None:
            ev = ""
            if v.eval_batches is not None:
                ev = f" + {v.eval_batches} of {v.eval_total_batches} evaluation batches"
            lines.append(
                f"verify: {v.window_s:.1f} s of training{ev} at batch {v.micro_batch} x {v.accumulation}: "
                f"{v.samples_per_s:,.1f} samples/s end to end ±{100 * v.spread / 2:.0f}%, {v.memory_text}"
            )
        if v.agreement is not None:
            a = v.agreement
            lines.append(f"verify vs probe: {a.status}: {a.text}; believe {a.believe}")
        if not v.ok:
            lines.append(f"verify: FAILED: {v.error}")
        if v.warning:
            lines.append(f"verify warning: {v.warning}")
        return lines


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def fits_label(c: Candidate) -> str:
    """What the table's fits column says: the same rules for every row, the compiled check included."""
    if c.usable:
        return "yes"
    if c.failure == "oom":
        return "OOM"
    if c.failure == "retries":
        return "no (retries)"
    if c.failure == "headroom":
        return "tight (headroom)"
    return "no"


# -- the plot ---------------------------------------------------------------------------------------------------
def _figure(r: AutotuneReport):
    """samples/s (median, bars: min..max of the repeats) and steady-state peak memory against batch size."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cands = sorted(r.candidates, key=lambda c: c.batch_size)
    cuda = any(c.peak_reserved_bytes is not None for c in cands)
    fig = Figure(figsize=(8.5, 5.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    _plot_rates(ax, cands)
    _plot_marks(ax, r)
    ax.set_xscale("log", base=2)
    sizes = sorted({c.batch_size for c in cands} | {s.batch_size for s in r.not_probed})
    if sizes and len(sizes) <= 16:
        ax.set_xticks(sizes, [str(b) for b in sizes], fontsize=7)
        ax.minorticks_off()
    ax.set_xlabel("batch size")
    ax.set_ylabel("samples/s", color="tab:blue")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    _plot_memory(ax2, r, cands, cuda)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    # The measured curves first; below the axes: a legend inside would cover the OOM markers on the x axis.
    pairs = sorted(
        zip(h1 + h2, l1 + l2),
        key=lambda p: not p[1].startswith(("train step", "verification", "steady-state", "peak RSS")),
    )
    fig.legend([h for h, _ in pairs], [lb for _, lb in pairs], loc="lower center", ncol=2, fontsize=7, frameon=False)
    ax.set_title(f"{r.config_name}: {r.model} {'x'.join(map(str, r.input_shape))}, {r.runtime}", fontsize=9)
    rows = (len(l1) + len(l2) + 1) // 2
    fig.subplots_adjust(bottom=0.14 + 0.035 * rows, top=0.92, left=0.1, right=0.88)
    return fig


def _plot_rates(ax, cands: list[Candidate]) -> None:
    """The probes' samples/s with their spread, the unreliable ones ringed, the sizes that did not fit."""
    timed = [(c, c.samples_per_s) for c in cands if c.samples_per_s is not None]
    if timed:
        xs = [c.batch_size for c, _ in timed]
        ys = [y for _, y in timed]
        lo = [y - min(c.rates or [y]) for c, y in timed]
        hi = [max(c.rates or [y]) - y for c, y in timed]
        ax.errorbar(
            xs,
            ys,
            yerr=[lo, hi],
            fmt="o-",
            color="tab:blue",
            capsize=3,
            label="train step samples/s (median; bars: min..max of the repeats)",
        )
        shaky = [(c.batch_size, y) for c, y in timed if not c.reliable]
        if shaky:
            ax.plot(*zip(*shaky), "o", mfc="none", mec="tab:red", markersize=12, label="unreliable (spread too large)")
    fails = [c for c in cands if c.samples_per_s is None or c.memory_failure]
    if fails:
        ax.plot(
            [c.batch_size for c in fails],
            [0] * len(fails),
            "x",
            color="tab:red",
            markersize=10,
            clip_on=False,
            label="does not fit (OOM / retries / headroom)",
        )


def _plot_marks(ax, r: AutotuneReport) -> None:
    """The compiled checks, the verification, the chosen size, the cap and the sizes the time left unprobed."""
    ok_compiled = [(c.batch_size, c.samples_per_s) for c in r.compiled_tried if c.usable and c.samples_per_s]
    if ok_compiled:
        ax.plot(*zip(*ok_compiled), "*", color="tab:green", markersize=14, label="compiled step")
    v = r.verify
    if v is not None and v.samples_per_s is not None:
        y = v.samples_per_s
        below, above = y - min(v.rates or [y]), max(v.rates or [y]) - y
        ax.errorbar(
            [v.micro_batch],
            [y],
            yerr=[[below], [above]],
            fmt="D",
            color="tab:purple",
            capsize=3,
            markersize=8,
            label=f"verification, end to end ({v.agreement.status if v.agreement else '?'})",
        )
    if r.chosen_batch is not None:
        ax.axvline(r.chosen_batch, color="tab:green", linestyle="--", linewidth=1, label=f"chosen {r.chosen_batch}")
    if r.limit == "cap" and r.max_batch:
        ax.axvline(
            r.max_batch,
            color="0.4",
            linestyle="-.",
            linewidth=1,
            label=f"search stopped at the cap ({r.max_batch}): larger sizes not probed",
        )
    skipped = [s for s in r.not_probed if s.reason == "time"]
    if skipped:
        ax.plot(
            [s.batch_size for s in skipped],
            [0] * len(skipped),
            "|",
            color="0.4",
            markersize=14,
            clip_on=False,
            label="not probed (time budget)",
        )


def _plot_memory(ax2, r: AutotuneReport, cands: list[Candidate], cuda: bool) -> None:
    """Peak memory (on CUDA what the budget is charged, on CPU RSS) and, on CUDA, the budget with its headroom.
    On CUDA the curve is each size's ``usage_bytes`` (peak reserved, plus memory in use before tuning and outside
    torch where the budget counts them), what the headroom test compares with the budget lines: peak reserved
    alone sat below them for a size refused for its headroom."""
    if cuda:
        mem = [
            (c.batch_size, (c.usage_bytes if c.usage_bytes is not None else c.peak_reserved_bytes) / GIB)
            for c in cands
            if c.peak_reserved_bytes is not None
        ]
        label = "steady-state memory charged (GiB)"
    else:
        mem = [(c.batch_size, c.peak_rss_bytes / GIB) for c in cands if c.peak_rss_bytes is not None]
        label = "peak RSS, process lifetime (GiB)"
    top = max((m for _, m in mem), default=0.0)
    if mem:
        ax2.plot(*zip(*mem), "s--", color="tab:orange", label=label)
    budget = r.budget.budget_bytes
    if cuda and budget:
        ax2.axhline(budget / GIB, color="tab:red", linewidth=1, label=f"budget {budget / GIB:.1f} GiB")
        ax2.axhline(
            (1 - r.headroom) * budget / GIB,
            color="tab:red",
            linestyle=":",
            linewidth=1,
            label=f"{r.headroom:.0%} headroom",
        )
        top = max(top, budget / GIB)
    ax2.set_ylabel(label, color="tab:orange")
    ax2.set_ylim(0, top * 1.08 if top else 1.0)  # the budget lines and the memory curve on one scale


def plot_report(report: AutotuneReport | dict[str, Any], path: str | os.PathLike) -> Path:
    """Write the plot as PNG (matplotlib's Agg canvas: no display needed); a report's JSON works too."""
    r = report if isinstance(report, AutotuneReport) else AutotuneReport.from_dict(report)
    fig = _figure(r)
    return write_new(Path(path), lambda p: fig.savefig(p, format="png"))


# -- files ------------------------------------------------------------------------------------------------------
def tuned_config(
    cfg: Config, plan: BatchPlan, loader_setting: dict[str, Any], *, world_size: int = 1
) -> tuple[Config, dict[str, Any]]:
    """The input config with the chosen train.batch_size / accumulation and loader knobs (nothing else).
    ``world_size``: the plan is per GPU; train.batch_size is the global batch over that many processes."""
    batch = plan.global_batch * world_size
    train = dataclasses.replace(cfg.train, batch_size=batch, accumulation=plan.accumulation)
    data = dataclasses.replace(cfg.data, **loader_setting)
    values = {"train.batch_size": batch, "train.accumulation": plan.accumulation}
    values.update({f"data.{k}": v for k, v in loader_setting.items()})
    return dataclasses.replace(cfg, train=train, data=data), values


def tuned_toml(cfg: Config, report: AutotuneReport) -> str:
    head = [
        f"# Written by `fasttrain autotune` on {datetime.now():%Y-%m-%d %H:%M} from config {cfg.name!r}.",
        f"# {report.runtime}; budget: {report.budget.describe()}",
    ]
    for k, v in report.tuned_values.items():
        head.append(f"# tuned: {k} = {v}")
    if report.plan:
        head.append(f"# {report.plan.note}")
    if report.loader:
        head.append(f"# loader: {report.loader.note}")
    return "\n".join(head) + "\n" + dump_config(cfg)


def write_outputs(cfg: Config, report: AutotuneReport, out: Path) -> None:
    """The tuned config (only when the report is ok: never a config known not to fit, or unverified advice),
    the PNG and the JSON (last, so it lists the others) into ``out``, each under a new name if one exists."""
    out.mkdir(parents=True, exist_ok=True)
    if report.plan is not None and report.ok:
        setting = report.loader.setting if report.loader else {}
        new_cfg, report.tuned_values = tuned_config(cfg, report.plan, setting, world_size=report.world_size)
        report.files["config"] = str(write_new_text(out / f"{cfg.name}.tuned.toml", tuned_toml(new_cfg, report)))
    if report.candidates:
        try:
            report.files["plot"] = str(plot_report(report, out / "autotune.png"))
        except Exception as e:  # noqa: BLE001 - a plot must never cost the user the result
            report.notes.append(f"plot not written: {type(e).__name__}: {e}")
    written = write_new_text(out / "autotune.json", json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    report.files["json"] = str(written)
