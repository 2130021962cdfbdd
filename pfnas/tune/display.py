"""What a study shows: the live progress table fed by a Tune callback, and the final :class:`StudySummary` and
:class:`TuneSummary` (rich, fits 80 columns)."""
from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from ray.tune import Callback

from ..config import selection_hash
from ..tracking import finite_scalar, format_value, policy_agreement
from .select import FinalsRecord, TrialRecord, finished, tie_loss
from .trial import ABBREV, TrialContext, trial_index, trial_run_name


def _short_names(keys: list[str]) -> list[str]:
    """Shortest dotted suffix of each key that is still unique (``search.arch_lr`` -> ``arch_lr``)."""
    out = []
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            cand = ".".join(parts[-n:])
            if sum(k == cand or k.endswith("." + cand) for k in keys) == 1:
                break
        out.append(cand)
    return out


def _headers(keys: list[str]) -> list[str]:
    """Column headers of tuned params in one short word (``search.optim.lr`` -> ``slr``): tables fit 100 columns."""
    short = _short_names(keys)
    heads = [ABBREV.get(k) or s for k, s in zip(keys, short)]
    return [h if heads.count(h) == 1 else s for h, s in zip(heads, short)]


_OP_ABBREV = {"prepend": "pre", "add": "add", "affine": "aff", "cross_attn": "xat", "none": "-"}


_STATUS = {"TERMINATED": "done", "STOPPED": "stopped", "ERROR": "error"}


@dataclass
class SeedGroup:
    """Trials of one configuration over several seeds: score mean ± std, mean alpha entropy, policy agreement."""

    label: str
    metric: str
    trials: list[TrialRecord]

    def policies(self) -> list[list[str]]:
        return [[op for op in str(r.metrics.get("policy", "")).split(",") if op] for r in self.trials]

    def stats(self) -> dict[str, Any]:
        vals = [r.value for r in self.trials]
        mean = sum(vals) / len(vals)
        std = (sum((v - mean) ** 2 for v in vals) / max(len(vals) - 1, 1)) ** 0.5
        ents = [float(r.metrics["search/alpha_entropy"]) for r in self.trials
                if finite_scalar(r.metrics.get("search/alpha_entropy"))]
        pols = self.policies()
        searched = len(ents) == len(self.trials) and all(pols) and len({len(p) for p in pols}) == 1
        return {"n": len(vals), "mean": mean, "std": std,
                "alpha_entropy": sum(ents) / len(ents) if searched else None,
                "agreement": policy_agreement(pols) if searched else None}

    def describe(self) -> str:
        st = self.stats()
        out = f"over seeds [{self.label}]: {self.metric} {st['mean']:.4f} ± {st['std']:.4f} (n={st['n']})"
        if st["agreement"] is not None:
            out += f", H(α) {st['alpha_entropy']:.2f}, policy agreement {st['agreement']:.2f}"
        return out


class _FitTable:
    """A table that takes the wide layout when it fits the console and the compact one otherwise (80 columns: the
    tuned params wrap in one column, the policy keeps its own)."""

    def __init__(self, build):
        self.build = build
        self.title = build(False).title

    def __rich_console__(self, console, options):
        from rich.measure import Measurement

        wide = self.build(False)
        natural = Measurement.get(console, options.update_width(100_000), wide).maximum
        yield wide if natural <= options.max_width else self.build(True)


@dataclass
class StudySummary:
    """Outcome of one study; renders as a rich table (``console.print(summary)``)."""

    name: str
    metric: str
    mode: str
    param_keys: list[str]
    trials: list[TrialRecord]
    best: TrialRecord | None
    best_config_path: Path | None
    experiment_path: str
    tracking_uri: str
    mlflow_experiment: str
    parent_run_id: str | None
    notes: list[str] = field(default_factory=list)
    finals: FinalsRecord | None = None
    group_finals: list[FinalsRecord] = field(default_factory=list)  # per grid variant / per Pareto-front point
    objectives: list[str] = field(default_factory=list)
    front: list[TrialRecord] = field(default_factory=list)  # Pareto studies: the non-dominated trials
    optuna_storage: str | None = None  # RDB URL of the Optuna study (optuna.load_study, optuna-dashboard)
    optuna_study: str | None = None
    interrupted: bool = False  # Tune stopped with trials left (Ctrl-C, SIGTERM): nothing selected, no finals

    def failure(self) -> str | None:
        """Why the study has no result (interrupted, or no trial finished with a score), or None when one did."""
        if self.interrupted:
            return (f"study {self.name} was interrupted before its "
                    + ("finals ended" if self.best is not None else "trials ended, nothing was selected")
                    + ": rerun with --resume to continue it")
        if finished(self.trials):
            return None
        errored = [r for r in self.trials if r.error]
        first = f"; first error: {errored[0].error}" if errored else ""
        return (f"study {self.name}: none of its {len(self.trials)} trials finished with {self.metric} "
                f"({len(errored)} errored), nothing was selected{first}")

    def seed_groups(self) -> list[SeedGroup]:
        """Finished trials that differ only in ``seed`` (``seed`` among a grid's params), one group per config:
        how a method varies over seeds, and (search) how reproducible its policy is."""
        if "seed" not in self.param_keys:
            return []
        groups: dict[tuple, list[TrialRecord]] = {}
        for r in self.trials:
            if r.status == "TERMINATED" and r.value is not None:
                key = tuple((k, format_value(r.params.get(k))) for k in self.param_keys if k != "seed")
                groups.setdefault(key, []).append(r)
        return [SeedGroup(" ".join(f"{k.split('.')[-1]}={v}" for k, v in key) or "all", self.metric, rs)
                for key, rs in groups.items() if len(rs) >= 2]

    def _table(self, compact: bool):
        """The trials table: one column per tuned param, or (``compact``) the params as one wrapped ``k=v`` column."""
        from rich import box
        from rich.table import Table
        from rich.text import Text

        counts = {s: sum(t.status == s for t in self.trials) for s in ("TERMINATED", "STOPPED", "ERROR")}
        retried = sum(t.retries > 0 for t in self.trials)
        title = (f"study {self.name}: {len(self.trials)} trials ({counts['TERMINATED']} finished, "
                 f"{counts['STOPPED']} stopped, {counts['ERROR']} errored"
                 + (f", {retried} retried)" if retried else ")"))
        t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        for col in ["trial", "state"]:
            t.add_column(col, no_wrap=True)
        short = _headers(self.param_keys)
        if compact:
            t.add_column("config", ratio=1, min_width=12)
        else:
            for key in short:
                t.add_column(key, no_wrap=True)
        t.add_column(self.metric.replace("_", "\n"), no_wrap=True)
        entropy = any(finite_scalar(r.metrics.get("search/alpha_entropy")) for r in self.trials)
        if entropy:  # mean normalised entropy of softmax(alpha) after the search: 1 = uniform, 0 = decided
            t.add_column("H(α)", no_wrap=True)
        t.add_column("tuned\nparams", no_wrap=True)
        t.add_column("policy", ratio=1, min_width=15)  # wraps between ops: one or more lines per trial
        for r in self.trials:
            star = "*" if self.best is not None and r.trial_id == self.best.trial_id else ""
            star += "+" if any(r is p for p in self.front) else ""
            policy = " ".join(_OP_ABBREV.get(op, op) for op in str(r.metrics.get("policy", "")).split(",") if op)
            tp = r.metrics.get("tuned_params")
            h = r.metrics.get("search/alpha_entropy")
            values = [format_value(r.params.get(k, "")) for k in self.param_keys]
            t.add_row(r.name + star, _STATUS.get(r.status, r.status),
                      *([Text(" ".join(f"{k}={v}" for k, v in zip(short, values)))] if compact
                        else [Text(v) for v in values]),
                      f"{r.value:.4f}" if r.value is not None else "-",
                      *([f"{h:.2f}" if finite_scalar(h) else "-"] if entropy else []),
                      f"{int(tp)}" if finite_scalar(tp) else "-", "-" if r.error else policy)
        return t

    def __rich__(self):
        from rich.console import Group
        from rich.text import Text

        t = _FitTable(self._table)
        lines = ["policy per layer: pre=prepend add=add aff=affine xat=cross_attn; * best trial"]
        lines += [f"trial {r.name} failed: {r.error}" for r in self.trials if r.error]
        lines += [f"trial {r.name} retried {r.retries}x from its last checkpoint"
                  + (f" after: {r.retry_error}" if r.retry_error else "") for r in self.trials if r.retries]
        if self.best is not None:
            lines.append(f"selected on validation: trial {self.best.name} {self.metric}={self.best.value:.4f}, "
                         f"policy {self.best.metrics.get('policy', '?')}; config -> {self.best_config_path}")
            tied = [r.name for r in finished(self.trials) if r.value == self.best.value and r is not self.best]
            if tied:
                loss = tie_loss(self.best, self.metric)
                lines.append(f"tied on {self.metric} with trial {', '.join(tied)}: " + (
                    f"the lowest val_loss decided ({loss:.4f})" if math.isfinite(loss) else "the earliest trial decided"))
            if self.finals is not None and self.finals.test_accs:
                lines.append(f"final: {self.finals.describe()}")
        else:
            lines.append(f"no trial reported {self.metric}")
        if self.front:
            lines.append(f"Pareto front of ({', '.join(self.objectives)}), + in the table: "
                         + "; ".join(f"{r.name} (" + ", ".join(format_value(v) for v in r.values) + ")"
                                     for r in self.front))
        for f in self.group_finals:
            if f.test_accs:
                mean, std = f.mean_std()
                lines.append(f"final [{f.label}]: test_acc {mean:.4f} ± {std:.4f} (n={len(f.test_accs)}, "
                             f"trial {f.name or f.trial_id})")
        lines += [g.describe() for g in self.seed_groups()]
        lines.append(f"MLflow: {self.tracking_uri} experiment {self.mlflow_experiment!r} parent run {self.parent_run_id}")
        lines.append(f"Tune: {self.experiment_path}")
        if self.optuna_study:
            lines.append(f"Optuna: study {self.optuna_study!r} in {self.optuna_storage} "
                         f"(optuna-dashboard {self.optuna_storage})")
        lines += self.notes
        return Group(t, Text("\n".join(lines)))


@dataclass
class TuneSummary:
    """All studies of one ``run_tune`` call."""

    studies: list[StudySummary]

    def failures(self) -> list[str]:
        """One line per study that ended without a result (``pfnas tune`` then exits 2)."""
        return [f for s in self.studies if (f := s.failure()) is not None]

    def __rich__(self):
        from rich.console import Group

        return Group(*self.studies)

    def __str__(self) -> str:
        from rich.console import Console

        buf = io.StringIO()
        Console(file=buf, width=160, color_system=None).print(self)
        return buf.getvalue()


DISPLAY: list[Any] = []  # the live table of this driver process (set by run_tune); Progress callbacks feed it


class Progress(Callback):
    """Driver-side Tune callback that feeds pfnas's live table. It holds plain data only: Tune pickles it with the
    run config, and a restored study's copy finds the display of the process that resumes it."""

    def __init__(self, title: str, metric: str, ctx: TrialContext, total: int, mode: str = "max"):
        self.title, self.metric, self.ctx, self.total, self.mode = title, metric, ctx, int(total), mode

    def _display(self):
        return DISPLAY[-1] if DISPLAY else None

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        d = self._display()
        if d is not None:
            d.update(self, trials)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        d = self._display()
        if d is not None:
            d.update(self, trials, done=trial)

    on_trial_error = on_trial_complete

    def on_experiment_end(self, trials: list, **info) -> None:
        d = self._display()
        if d is not None:
            d.update(self, trials, end=True)


def _resolve(cb: Progress, trial) -> tuple[TrialContext, dict]:
    """The context and own params of a Tune trial (one config of a several-config finals run, or itself)."""
    try:
        return cb.ctx.resolve(trial.config or {})
    except (KeyError, TypeError, ValueError, IndexError):
        return cb.ctx, trial.config or {}


def _eta(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


def _log_line(view, text: str) -> None:
    """Off a terminal: one line of ``view`` (a :class:`LiveTable` or :class:`TaskBoard`) printed whole, never
    wrapped at the console's width (a log is read by tools), and the time of its last line kept."""
    view.console.print(text, highlight=False, markup=False, soft_wrap=True)
    view._last = time.monotonic()


class LiveTable:
    """One live rich table per Tune run: trial, state, key params, phase (epoch of planned), the latest value of the
    study metric and an ETA from epochs done vs planned (search.epochs + train.epochs). On a terminal it redraws in
    place (at most twice a second); elsewhere (a log file, a pipe) it prints a start line with the plan, one line per
    finished trial and a progress line at least every :attr:`LOG_EVERY_S` seconds. Trials go by their MLflow run
    name (``t03``, ``t03 final s1``)."""

    LOG_EVERY_S = 60.0  # off a terminal: a progress line at least this often

    def __init__(self, console=None, refresh_s: float = 0.5):
        from rich.console import Console

        self.console = console or Console()
        self.refresh_s = refresh_s
        self.live = None
        self.t0 = None
        self._last = 0.0
        self._planned: dict[str, tuple[int, int, str, str | None]] = {}
        self._said: set[str] = set()
        self._owner = None

    def _plan(self, cb: Progress, trial) -> tuple[int, int, str, str | None]:
        """(search epochs, retrain epochs, method.kind, selection hash) of a trial, from its config (built once per
        trial); trials with one selection hash (a retrain-lr grid) share one search or selection loop."""
        if trial.trial_id not in self._planned:
            try:
                tctx, params = _resolve(cb, trial)
                cfg = tctx.config(params, "x")
                plan = (cfg.search.epochs if cfg.method.kind == "search" else 0, cfg.train.epochs, cfg.method.kind,
                        selection_hash(cfg))
            except Exception:  # noqa: BLE001
                plan = (0, 0, "", None)
            self._planned[trial.trial_id] = plan
        return self._planned[trial.trial_id]

    def shared(self, cb: Progress, trials: list) -> set[str]:
        """Ids of the trials whose search or selection loop an earlier trial (by index) of the same selection
        hash runs: they copy it, so only their retrain is planned."""
        seen, out = set(), set()
        for t in sorted(trials, key=lambda t: (trial_index(t) or 0, t.trial_id)):
            key = self._plan(cb, t)[3]
            if key is not None and key in seen:
                out.add(t.trial_id)
            seen.add(key)
        return out

    def _progress(self, cb: Progress, trial, shared: bool = False) -> tuple[float, float, str]:
        """(epochs done, planned, phase text) of a trial from its last result. A selection loop (random search,
        evolution, one-shot) counts as the epochs of ``train`` its budget buys, from the images it has spent
        (``*/select_epochs_done`` / ``*/select_epochs_planned`` in its reports; unknown before its first).
        ``shared``: an earlier trial runs its selection (:meth:`shared`), which is planned there, unless this
        one reports a search or selection of its own (the earlier one failed)."""
        r = trial.last_result or {}
        search_epochs, train_epochs, _, _ = self._plan(cb, trial)
        sel_planned = max((float(v) for k, v in r.items() if k.endswith("/select_epochs_planned")), default=0.0)
        sel_done = max((float(v) for k, v in r.items() if k.endswith("/select_epochs_done")), default=None)
        if shared and not sel_planned and r.get("phase") != "search":
            search_epochs = 0
        planned = search_epochs + sel_planned + train_epochs
        phase, epoch = str(r.get("phase", "")), int(r.get("epoch", 0) or 0)
        if phase in ("done", "failed") or trial.status in ("TERMINATED", "ERROR"):
            return planned, planned, phase or trial.status.lower()
        if phase == "search":
            return epoch, planned, f"search {epoch}/{search_epochs}"
        if phase == "retrain":
            return search_epochs + sel_planned + epoch, planned, f"retrain {epoch}/{train_epochs}"
        if sel_done is not None and sel_planned:
            done = min(sel_done, sel_planned)
            return done, planned, f"{phase} ({100 * done / sel_planned:.0f}% of the budget)"
        return 0, planned, "" if trial.status == "PENDING" else (phase or "starting")

    def _table(self, cb: Progress, trials: list, done=None):
        from rich import box
        from rich.table import Table

        now = time.monotonic()
        rows, done_all, planned_all, best = [], 0, 0, None
        finished = {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}
        if done is not None:  # the trial being completed: Tune sets its status after the callbacks
            finished.add(done.trial_id)
        shared = self.shared(cb, trials)
        for t in sorted(trials, key=lambda t: (trial_index(t) or 0, t.trial_id)):
            n, planned, phase = self._progress(cb, t, t.trial_id in shared)
            if t.trial_id in finished:
                n = planned
            done_all, planned_all = done_all + n, planned_all + planned
            r = t.last_result or {}
            v = r.get(cb.metric)
            if finite_scalar(v) and t.trial_id in finished and not r.get("error"):
                best = v if best is None else (max(best, v) if cb.mode == "max" else min(best, v))
            rows.append((t, phase, v, n, planned, r))
        missing = max(cb.total - len(trials), 0)  # trials not created yet: planned like the last one
        if missing and rows:
            planned_all += missing * rows[-1][4]
        elapsed = now - self.t0
        eta = elapsed * (planned_all - done_all) / done_all if done_all else None
        n_done = len(finished)
        if cb.ctx.kind == "final":  # finals report test scores: no "best" among them, nothing is chosen there
            best = None
        self._counts, self._eta = (n_done, best), eta
        title = (f"{cb.title}: {n_done}/{cb.total} trials"
                 + (f", best {cb.metric} {best:.4f}" if best is not None else "") + f", elapsed {_eta(elapsed)}"
                 + (f", ETA {_eta(eta)}" if n_done < cb.total else ""))
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        table.add_column("trial", no_wrap=True)  # its MLflow run name: t03, a final t03 final s1
        table.add_column("state", no_wrap=True)
        keys = [k for k in cb.ctx.param_keys]
        for k in _headers(keys):
            table.add_column(k, no_wrap=True, max_width=10, overflow="ellipsis")
        table.add_column("phase", no_wrap=True)
        table.add_column(cb.metric, no_wrap=True)
        table.add_column("ETA", no_wrap=True)
        for t, phase, v, done, planned, r in rows:
            t_eta = None
            if t.status == "RUNNING" and done and finite_scalar(r.get("time_total_s")):
                t_eta = float(r["time_total_s"]) * (planned - done) / done
            state = {"TERMINATED": "done", "ERROR": "error"}.get(t.status, t.status.lower())
            params = _resolve(cb, t)[1]
            table.add_row(self._name(cb, t), state,
                          *[format_value(params.get(k, "")) for k in keys], phase,
                          f"{v:.4f}" if finite_scalar(v) else "-", _eta(t_eta) if t.status == "RUNNING" else "")
        return table, title

    def update(self, cb: Progress, trials: list, done=None, end: bool = False) -> None:
        from rich.live import Live

        if self._owner is not cb:  # a new Tune run (the finals after the study): a fresh table
            self.close()
            self._owner, self.t0, self._said = cb, time.monotonic(), set()
        terminal = self.console.is_terminal and not self.console.is_dumb_terminal
        if not terminal:  # a start line, one line per finished trial, and progress at least once a minute
            self._log_lines(cb, trials, done)
            return
        now = time.monotonic()
        if not (end or done is not None) and now - self._last < self.refresh_s:
            return
        self._last = now
        from rich.console import Group
        from rich.text import Text

        table, title = self._table(cb, trials, done)
        table = Group(Text(title, style="bold"), table)
        if self.live is None:
            self.live = Live(table, console=self.console, auto_refresh=False, transient=True)
            self.live.start()
        self.live.update(table, refresh=True)
        if end:
            self.close()

    @staticmethod
    def _name(cb: Progress, trial) -> str:
        """A trial's name, as its MLflow run's."""
        tctx, params = _resolve(cb, trial)
        return tctx.run_name(params, trial.trial_id, trial_index(trial))

    def _log_lines(self, cb: Progress, trials: list, done=None) -> None:
        """Off a terminal (a log file, a pipe): what the live table would show, as plain lines."""
        now = time.monotonic()
        say = partial(_log_line, self)
        if not self._said:  # the plan, once per Tune run
            self._said.add("")
            search_e, train_e, kind, _ = self._plan(cb, trials[0]) if trials else (0, 0, "", None)
            epochs = f" of {search_e}+{train_e} epochs" if search_e else (f" of {train_e} epochs" if train_e else "")
            if kind in ("random", "evolution", "oneshot") and train_e:
                epochs = f" of a {kind} selection + {train_e} epochs"
            say(f"{cb.title}: {cb.total} trials{epochs}; a line per trial, progress each minute")
        if done is not None and done.trial_id not in self._said:
            self._said.add(done.trial_id)
            self._table(cb, trials, done)
            r = done.last_result or {}
            v = r.get(cb.metric)
            state = "error" if done.status == "ERROR" or r.get("error") else "done"
            n_done, best = self._counts
            say(f"{cb.title}: {self._name(cb, done)} {state}"
                + (f" {cb.metric}={v:.4f}" if finite_scalar(v) else "")
                + f" | {n_done}/{cb.total} done" + (f", best {best:.4f}" if best is not None else "")
                + f", {_eta(now - self.t0)}" + (f", ETA {_eta(self._eta)}" if n_done < cb.total else ""))
        elif now - self._last >= self.LOG_EVERY_S:
            self._table(cb, trials, done)
            n_done, best = self._counts
            running = [t for t in trials if t.status == "RUNNING"]
            shared = self.shared(cb, trials)
            phases = ", ".join(f"{self._name(cb, t)} {self._progress(cb, t, t.trial_id in shared)[2]}"
                               for t in running[:4])
            say(f"{cb.title}: {n_done}/{cb.total} done, {len(running)} running"
                + (f" ({phases})" if phases else "") + (f", best {best:.4f}" if best is not None else "")
                + f", {_eta(now - self.t0)}" + (f", ETA {_eta(self._eta)}" if self._eta is not None else ""))

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
        self._owner = None




@dataclass
class FailedStudy:
    """A study of a several-study run that ended in an error (or never started): the others went on; one line in
    the summary, and ``pfnas tune`` exits 2."""

    name: str
    error: str

    def failure(self) -> str:
        return f"study {self.name} failed: {self.error}"

    def __rich__(self):
        from rich.text import Text

        return Text(self.failure())


@dataclass
class _TaskRow:
    """What :class:`TaskBoard` knows of one study: its trials' counts and epochs, the best val score, its finals."""

    started: float | None = None
    done: int = 0
    running: int = 0
    total: int = 0
    best: float | None = None
    epochs_done: float = 0
    epochs_planned: float = 0
    finals_done: int = 0
    finals_total: int = 0
    ended: float | None = None
    phases: tuple[str, ...] = ()  # what its running trials do now (their phase text)

    def eta(self, now: float) -> float | None:
        """Seconds left for its trials, from the epochs done so far (None before the first)."""
        if self.started is None or not self.epochs_done:
            return None
        return (now - self.started) * max(self.epochs_planned - self.epochs_done, 0) / self.epochs_done


class TaskBoard:
    """The live view of studies running side by side: one row per study (trials done/running/queued, best
    validation score, finals, ETA) under an overall line. On a terminal it redraws in place (at most twice a second);
    elsewhere (a log file, a pipe) it prints a start line per study, one line per finished trial, prefixed by its
    study, and a progress line over every study at least every :attr:`LiveTable.LOG_EVERY_S` seconds. Fed by the
    studies' :class:`Progress` callbacks from their driver threads (hence the lock)."""

    def __init__(self, console=None, studies: list[str] | None = None, slots: int = 1, refresh_s: float = 0.5):
        import threading

        from rich.console import Console

        self.console = console or Console()
        self.rows: dict[str, _TaskRow] = {name: _TaskRow() for name in studies or []}
        self.slots, self.refresh_s = max(int(slots), 1), refresh_s
        self.t0 = time.monotonic()
        self.lock = threading.RLock()
        self.meter = LiveTable(self.console)  # its epoch bookkeeping (planned epochs per trial), never drawn
        self.live = None
        self._last = 0.0
        self._said: set[tuple[str, str]] = set()

    def _count(self, cb: Progress, trials: list, done=None) -> _TaskRow:
        row = self.rows.setdefault(cb.ctx.study, _TaskRow())
        now = time.monotonic()
        if row.started is None:
            row.started = now
        finished_ids = {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}
        if done is not None:  # Tune sets its status after the callbacks
            finished_ids.add(done.trial_id)
        if cb.ctx.kind == "final":
            row.finals_done, row.finals_total = len(finished_ids), cb.total
            return row
        row.done, row.total = len(finished_ids), cb.total
        row.running = sum(t.status == "RUNNING" and t.trial_id not in finished_ids for t in trials)
        shared = self.meter.shared(cb, trials)
        row.phases = tuple(self.meter._progress(cb, t, t.trial_id in shared)[2] for t in trials
                           if t.status == "RUNNING" and t.trial_id not in finished_ids)
        n_all = planned_all = 0
        for t in trials:
            n, planned, _ = self.meter._progress(cb, t, t.trial_id in shared)
            n_all += planned if t.trial_id in finished_ids else n
            planned_all += planned
            r = t.last_result or {}
            v = r.get(cb.metric)
            if t.trial_id in finished_ids and finite_scalar(v) and not r.get("error"):
                row.best = v if row.best is None else (max(row.best, v) if cb.mode == "max" else min(row.best, v))
        if trials and cb.total > len(trials):  # trials not created yet: planned like the last one
            last = trials[-1]
            planned_all += (cb.total - len(trials)) * self.meter._progress(cb, last, last.trial_id in shared)[1]
        row.epochs_done, row.epochs_planned = n_all, planned_all
        return row

    def overall_eta(self, now: float) -> float | None:
        """Rough seconds left for the whole run: the running studies' longest ETA, plus the waiting studies at the
        mean duration of the started ones, ``slots`` at a time."""
        started = [r for r in self.rows.values() if r.started is not None]
        etas = [r.eta(now) for r in started if r.ended is None]
        if not started or any(e is None for e in etas):
            return None
        spans = [(r.ended or now) - r.started + (r.eta(now) or 0.0) if r.ended is None else r.ended - r.started
                 for r in started]
        waiting = len(self.rows) - len(started)
        return max(etas, default=0.0) + math.ceil(waiting / self.slots) * sum(spans) / len(spans)

    def _view(self):
        from rich import box
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        now = time.monotonic()
        done = sum(r.done for r in self.rows.values())
        total = sum(r.total for r in self.rows.values())
        running = sum(r.started is not None and r.ended is None for r in self.rows.values())
        title = (f"{len(self.rows)} studies ({running} running, {self.slots} at a time): {done}/{total or '?'} trials "
                 f"done, elapsed {_eta(now - self.t0)}, ETA {_eta(self.overall_eta(now))}")
        t = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        for col in ("study", "done", "run", "queued", "best", "finals", "ETA"):
            t.add_column(col, no_wrap=col != "study", overflow="fold")
        for name, r in self.rows.items():
            waiting = r.started is None
            queued = max(r.total - r.done - r.running, 0)
            t.add_row(name, "-" if waiting else f"{r.done}/{r.total}", "-" if waiting else str(r.running),
                      "waiting" if waiting else str(queued), f"{r.best:.4f}" if r.best is not None else "-",
                      f"{r.finals_done}/{r.finals_total}" if r.finals_total else "-",
                      "done" if r.ended is not None else ("" if waiting else _eta(r.eta(now))))
        return Group(Text(title, style="bold"), t)

    def _line(self, cb: Progress, row: _TaskRow, done) -> str:
        r = done.last_result or {}
        v = r.get(cb.metric)
        state = "error" if done.status == "ERROR" or r.get("error") else "done"
        _, params = _resolve(cb, done)
        if cb.ctx.kind == "final":
            what, counts = f"final seed {params.get('seed')}", f"{row.finals_done}/{row.finals_total} finals done"
        else:
            what, counts = trial_run_name(trial_index(done), done.trial_id), f"{row.done}/{row.total} trials done"
            if row.best is not None:
                counts += f", best {cb.metric} {row.best:.4f}"
        now = time.monotonic()
        return (f"{cb.ctx.study}: {what} {state}" + (f" {cb.metric}={v:.4f}" if finite_scalar(v) else "")
                + f" | {counts} | all: elapsed {_eta(now - self.t0)}, ETA {_eta(self.overall_eta(now))}")

    def _progress_line(self, now: float) -> str:
        parts = []
        for name, r in self.rows.items():
            if r.started is None:
                parts.append(f"{name} waiting")
                continue
            text = f"{name} {r.done}/{r.total or '?'}"
            if r.ended is not None:
                text += " done"
            elif r.running:
                text += f" ({r.running} running: {', '.join(p for p in r.phases if p) or 'starting'})"
            if r.finals_total:
                text += f", finals {r.finals_done}/{r.finals_total}"
            parts.append(text)
        return (f"progress, elapsed {_eta(now - self.t0)}, ETA {_eta(self.overall_eta(now))}: "
                + "; ".join(parts))

    def update(self, cb: Progress, trials: list, done=None, end: bool = False) -> None:
        from rich.live import Live

        with self.lock:
            row = self._count(cb, trials, done)
            terminal = self.console.is_terminal and not self.console.is_dumb_terminal
            if not terminal:  # a start line per study, a line per finished trial, progress at least once a minute
                now = time.monotonic()
                say = partial(_log_line, self)
                start = (cb.ctx.study, f"{cb.ctx.kind}:start")
                if start not in self._said:
                    self._said.add(start)
                    what = "finals" if cb.ctx.kind == "final" else "trials"
                    say(f"{cb.ctx.study}: started, {cb.total} {what}")
                key = (cb.ctx.study, f"{cb.ctx.kind}:{done.trial_id}") if done is not None else None
                if key is not None and key not in self._said:
                    self._said.add(key)
                    say(self._line(cb, row, done))
                elif now - self._last >= LiveTable.LOG_EVERY_S:
                    say(self._progress_line(now))
                return
            now = time.monotonic()
            if not (end or done is not None) and now - self._last < self.refresh_s:
                return
            self._last = now
            if self.live is None:
                self.live = Live(self._view(), console=self.console, auto_refresh=False, transient=True)
                self.live.start()
            self.live.update(self._view(), refresh=True)

    def study_ended(self, name: str) -> None:
        """Study ``name`` is over (selected, finals run, or failed): its row says done."""
        with self.lock:
            row = self.rows.setdefault(name, _TaskRow())
            row.ended = time.monotonic()
            if self.live is not None:
                self.live.update(self._view(), refresh=True)

    def close(self) -> None:
        """A study's Tune run ended (``_fit``): the board stays up for the others."""

    def finish(self) -> None:
        with self.lock:
            if self.live is not None:
                self.live.stop()
                self.live = None
