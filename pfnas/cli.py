"""``pfnas`` command line. User errors print one line and exit with code 2."""
from __future__ import annotations

import json
import signal
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from .config import DataError, PfnasError, StudyError, load_config

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Per-layer prompt fusion search for frozen Vision Transformers.")
baseline_app = typer.Typer(no_args_is_help=True, help="Discrete baselines under the search budget.")
data_app = typer.Typer(no_args_is_help=True, help="Data set utilities.")
app.add_typer(baseline_app, name="baseline")
app.add_typer(data_app, name="data")
console = Console()

def _flag(default: bool, *names: str, **kw):
    """A boolean flag option shown without a ``<bool>`` type (it takes no value: ``--resume``, not ``--resume true``)."""
    return typer.Option(default, *names, metavar="", **kw)


ConfigOpt = typer.Option(None, "--config", "-c", help="Experiment YAML (defaults: embedded offline demo).")
SetOpt = typer.Option(None, "--set", "-s", help="Override a field, e.g. --set search.arch_lr=1e-3 (repeatable).")
OutOpt = typer.Option(None, "--out", "-o", help="Output directory (default: <output_dir>/<name>).")
TrackOpt = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                        help="Log the run to MLflow here (sqlite:///mlflow.db, http://host:5000); default: no MLflow.")
ExpOpt = typer.Option(None, "--experiment", help="MLflow experiment (default: <name>-<task>).")


def _version_callback(value: bool):
    if value:
        from . import __version__

        print(f"pfnas {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(version: bool = _flag(False, "--version", callback=_version_callback, is_eager=True,
                                       help="Print the pfnas version and exit.")):
    """Per-layer prompt fusion search for frozen Vision Transformers."""


def _runner(tracking_uri: Optional[str], experiment: Optional[str], verb: str = "run"):
    """``run_method``, or the same logged to MLflow as one run when a tracking URI is given (its MLflow source is
    ``pfnas <verb>``). ``--experiment`` alone logs to the default store (``sqlite:///mlflow.db``, where
    ``pfnas compare`` reads by default)."""
    if not tracking_uri and not experiment:
        from .methods import run_method

        return run_method
    from functools import partial

    from .runs import run_logged

    return partial(run_logged, tracking_uri=tracking_uri, experiment=experiment, source=f"pfnas {verb}")


def _score(res: dict) -> str:
    """The one score of a run: test accuracy (stage final) or val accuracy (stage select)."""
    if res.get("test_acc") is not None:
        return f"test acc {res['test_acc']:.4f}"
    return f"val acc {res['val_acc']:.4f} (stage select: test not read)"


def _cfg(config: Optional[Path], overrides: Optional[List[str]]):
    """The experiment config: ``-c`` (a file or an embedded name), else the embedded ``demo`` (the same config as
    ``-c demo`` and the base of ``search_spaces/demo.yaml``)."""
    return load_config(config or "demo", overrides)


def _print_result(res: dict, out_dir: Path) -> None:
    """What ``pfnas run`` prints for one run: its policy, then its score, tuned params, times and folder."""
    console.print(f"policy: {json.dumps({str(k): v for k, v in res['policy'].items()})}")
    times = "".join(f"  {k.split('_')[0]} {res[k]:.1f}s" for k in ("search_time_s", "retrain_time_s") if k in res)
    console.print(f"{_score(res)}  tuned params {res['tuned_params']} "
                  f"({res['tuned_percent']:.2f}%){times}  -> {out_dir}")


def _print_seeds(summary: dict) -> None:
    """A fixed / probe baseline over seeds: the stage's score mean ± std (n), as ``pfnas run`` words it."""
    key = "test_acc" if summary["stage"] == "final" else "val_acc"
    accs = summary[f"{key}s"]
    what = "linear probe" if summary["method"] == "probe" else f"fixed {summary['op']} on every layer"
    score = "test acc" if key == "test_acc" else "val acc"
    each = ", ".join(f"seed {s} {a:.4f}" for s, a in zip(summary["seeds"], accs))
    console.print(f"{what}: {score} {summary[f'{key}_mean']:.4f} ± {summary[f'{key}_std']:.4f} (n={len(accs)}; "
                  f"{each})  tuned params {summary['tuned_params']} ({summary['tuned_percent']:.2f}%)  "
                  f"-> {summary['out_dir']}")


def _out(cfg, out: Optional[Path], suffix: str = "") -> Path:
    """The output folder, created and checked writable up front (a bad path is one error line, exit 2)."""
    path = Path(out) if out else Path(cfg.output_dir) / (cfg.name + suffix)
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise PfnasError(f"output folder {path} is not writable: {e.strerror or e}") from None
    return path


@app.command()
def search(config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = SetOpt, out: Optional[Path] = OutOpt):
    """Bilevel search only: writes policy.json, alpha.pt, search.pt and log.jsonl (resumes if present)."""
    from .engine import Experiment, claim_run_dir, run_search

    cfg = _cfg(config, overrides)
    out_dir = _out(cfg, out)
    with claim_run_dir(cfg, out_dir):  # locked; resumes only the same configuration
        exp = Experiment.build(cfg)
        phase = run_search(exp, out_dir, progress=True)
    console.print(f"policy: {json.dumps(phase.policy)}")
    console.print(f"wrote {out_dir / 'policy.json'}")


@app.command()
def retrain(policy: Path = typer.Option(..., "--policy", "-p", help="policy.json / .yaml from `pfnas search`."),
            config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = SetOpt,
            out: Optional[Path] = OutOpt):
    """Retrain a fixed policy (train+val -> test; train -> val with --set train.stage=select); resumable."""
    from .engine import Experiment, backbone_param_count, run_retrain
    from .model import load_policy

    cfg = _cfg(config, overrides)
    pol = load_policy(policy)
    out_dir = _out(cfg, out, "-retrain")
    exp = Experiment.build(cfg)
    phase = run_retrain(exp, pol, out_dir, progress=True)
    last = phase.history[-1]
    tuned = phase.model.tuned_parameter_count()
    res = {"val_acc": last.get("val_acc"), "test_acc": last.get("test_acc"), "tuned_params": tuned,
           "tuned_percent": 100 * tuned / backbone_param_count(exp.backbone), "policy": pol}
    (out_dir / "result.json").write_text(json.dumps(res, indent=1, default=str))
    console.print(f"{_score(res)}  tuned params {tuned} ({res['tuned_percent']:.2f}%)")


@app.command()
def run(config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = SetOpt, out: Optional[Path] = OutOpt,
        tracking_uri: Optional[str] = TrackOpt, experiment: Optional[str] = ExpOpt):
    """Search, discretize, retrain and test in one go (or the config's method.kind); resumable."""
    cfg = _cfg(config, overrides)
    out_dir = _out(cfg, out)
    res = _runner(tracking_uri, experiment, "run")(cfg, out_dir, progress=True)
    _print_result(res, out_dir)


@app.command()
def tune(space: Path = typer.Option(..., "--space", help="Search-space YAML (search_spaces/*.yaml)."),
         address: Optional[str] = typer.Option(None, "--address", envvar="RAY_ADDRESS",
                                               help="Ray cluster address (auto, ray://...); default: local."),
         tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                                                    help="MLflow tracking URI (default sqlite:///mlflow.db)."),
         experiment: Optional[str] = typer.Option(None, "--experiment", help="MLflow experiment / study name."),
         storage: Optional[str] = typer.Option(None, "--storage", help="Ray Tune storage path or URI (s3://...)."),
         resume: bool = _flag(False, "--resume", help="Continue an interrupted study (Tuner.restore)."),
         num_samples: Optional[int] = typer.Option(None, "--num-samples", help="Override the space's num_samples."),
         max_concurrent_studies: Optional[int] = typer.Option(
             None, "--max-concurrent-studies", min=1, help="Task studies at once (override the space's "
                                                           "max_concurrent_studies; default: as the cluster holds)."),
         optuna_storage: Optional[str] = typer.Option(
             None, "--optuna-storage", help="Optuna study storage (RDB URL, e.g. sqlite:///optuna.db; none: in memory). "
                                            "Default: optuna.db next to a sqlite MLflow db, else in --storage."),
         verbose: bool = _flag(False, "--verbose", "-v", help="Ray Tune's own per-trial output instead of "
                                                                     "the live pfnas table."),
         overrides: Optional[List[str]] = SetOpt):
    """Ray Tune study with OptunaSearch over a YAML space; every trial logs to MLflow."""
    from .tune import run_tune

    summary = run_tune(space, address=address, tracking_uri=tracking_uri, experiment=experiment,
                       storage=str(storage) if storage else None, resume=resume, overrides=overrides,
                       num_samples=num_samples, optuna_storage=optuna_storage, verbose=verbose, console=console,
                       max_concurrent_studies=max_concurrent_studies)
    console.print(summary)
    failures = summary.failures()
    if failures:  # the table above shows each failed trial; a study without any result is not a success
        raise StudyError(" | ".join(failures))


@app.command()
def predict(images: List[Path] = typer.Argument(..., help="Image files and/or folders (searched recursively)."),
            model: str = typer.Option(..., "--model", "-m", help="Export or run folder, or runs:/<id>/model, "
                                                                 "models:/<name>/<version>."),
            top_k: int = typer.Option(5, "--top-k", min=1, help="Classes shown per image."),
            csv_out: Optional[Path] = typer.Option(None, "--csv", help="Also write path,rank,class,prob rows here."),
            batch_size: int = typer.Option(64, "--batch-size", min=1),
            device: str = typer.Option("cpu", "--device", help="auto, cpu, cuda, cuda:N or mps."),
            backbone_checkpoint: Optional[Path] = typer.Option(None, "--backbone-checkpoint",
                                                               help="The backbone checkpoint, when it moved."),
            tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                                                       help="MLflow store for runs:/ and models:/ URIs."),
            skip_bad: bool = _flag(False, "--skip-bad",
                                          help="Predict the readable images and list each unreadable one on stderr "
                                               "('pfnas: skipped: ...'); exit 3 when any was skipped, 2 when none "
                                               "was readable. Without it an unreadable image stops with exit 2.")):
    """Top-k classes of images with an exported model (decoded as the training data's evaluation split).

    Exit codes: 0 every image predicted; 2 an error (bad model, missing or unreadable image); 3 with --skip-bad,
    some images skipped (the others are predicted and written)."""
    import csv

    from rich.table import Table

    from .engine import resolve_device
    from .export import list_images, predict_files
    from .tracking.artifacts import load_model

    paths = list_images(images)
    net = load_model(model, device=resolve_device(device), tracking_uri=tracking_uri,
                     backbone_checkpoint=backbone_checkpoint)
    skipped: Optional[list] = [] if skip_bad else None
    try:
        results = predict_files(net, paths, top_k=top_k, batch_size=batch_size, skipped=skipped)
    except DataError as e:
        if skip_bad:
            raise
        raise DataError(f"{e} (--skip-bad predicts the other images)") from None
    for _, reason in skipped or []:
        print(f"pfnas: skipped: {' '.join(reason.split())}", file=sys.stderr)
    if not results:
        raise DataError(f"no readable image among the {len(paths)} given")
    if csv_out is not None:
        csv_out.parent.mkdir(parents=True, exist_ok=True)
        with open(csv_out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "rank", "class", "prob"])
            for p, top in results:
                w.writerows([str(p), r, c, f"{q:.6g}"] for r, (c, q) in enumerate(top, 1))
    skipped_note = f", {len(skipped)} skipped" if skipped else ""
    table = Table(title=f"top-{min(top_k, len(net.classes))} of {len(results)} image(s){skipped_note}")
    for col in ("image", "rank", "class", "prob"):
        table.add_column(col, justify="right" if col in ("rank", "prob") else "left", overflow="fold")
    for p, top in results:
        for r, (c, q) in enumerate(top, 1):
            table.add_row(str(p) if r == 1 else "", str(r), c, f"{q:.4f}", end_section=r == len(top))
    console.print(table)
    if csv_out is not None:
        console.print(f"wrote {csv_out}")
    if skipped:
        raise typer.Exit(3)


@app.command()
def compare(experiment: Optional[str] = typer.Option(None, "--experiment", help="MLflow experiment (default: all)."),
            tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI"),
            metric: str = typer.Option("val_acc", "--metric", help="Ranking metric (a validation score; a test metric is shown but selects nothing)."),
            out: Path = typer.Option(Path("compare"), "--out", "-o", help="Folder for CSV, plot and best YAML."),
            pareto: Optional[str] = typer.Option(None, "--pareto", help="Also draw the front of the metric against "
                                                 "tuned_params or infer_ms_per_image (pareto.png, pareto.csv).")):
    """Table of runs from MLflow (rich + CSV), accuracy vs tuned-params plot, best config as YAML."""
    from .tracking import compare_runs

    compare_runs(tracking_uri=tracking_uri, experiment=experiment, metric=metric, out_dir=out, console=console,
                 pareto=pareto)


REPORT_FORMATS = ("markdown", "csv", "latex")


@app.command()
def report(experiment: Optional[List[str]] = typer.Option(None, "--experiment", help="MLflow experiment of the "
                                                          "studies (repeatable)."),
           experiment_prefix: Optional[str] = typer.Option(None, "--experiment-prefix",
                                                           help="Every MLflow experiment whose name starts with this."),
           tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI"),
           out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write report.md, .csv, .tex and .png here."),
           fmt: Optional[str] = typer.Option(None, "--format", help="Print markdown, csv or latex instead of the "
                                                                     "terminal table."),
           log_to_parent: bool = _flag(True, "--log-to-parent/--no-log-to-parent",
                                              help="Log the report files on each study's MLflow parent run.")):
    """Results table of studies' finals: methods x tasks (test mean ± std (n)), VTAB group means, params, cost."""
    from .tracking.report import build_report, write_report

    if fmt is not None and fmt not in REPORT_FORMATS:
        raise PfnasError(f"--format {fmt!r}: choose from {', '.join(REPORT_FORMATS)}")
    rep = build_report(tracking_uri, experiment, experiment_prefix)
    files = write_report(rep, out, log_to_parent)
    if fmt is None:
        console.print(rep.rich_table())
    else:
        sys.stdout.write({"markdown": rep.markdown, "csv": rep.csv, "latex": rep.latex}[fmt]())
    if fmt is None and files:
        console.print(f"wrote {', '.join(str(f) for f in files)}")
    if fmt is None and log_to_parent and rep.parent_run_ids:
        console.print(f"logged report/ on {len(rep.parent_run_ids)} study parent run(s)")


@app.command()
def bench(config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = SetOpt,
          batch_size: int = typer.Option(32, "--batch-size"), steps: int = typer.Option(10, "--steps"),
          warmup: int = typer.Option(3, "--warmup"),
          policy: Optional[Path] = typer.Option(None, "--policy", "-p",
                                                help="Policy file for the retrained row (default: ops cycled)."),
          num_classes: int = typer.Option(10, "--num-classes", help="Head size of the benchmarked models."),
          e2e: bool = _flag(False, "--e2e", help="Also run search+retrain+test on the config's task and "
                                                        "compare its wall time with its pure step time."),
          e2e_dir: Optional[Path] = typer.Option(None, "--e2e-dir", help="Keep the end-to-end run here."),
          torch_compile: bool = _flag(False, "--compile", help="torch.compile each row's model first "
                                                                      "(a row that fails to compile reports an error)."),
          out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the table as JSON here.")):
    """Images/s of frozen forward, VPT-deep, soft / single-path search and retrained-policy steps."""
    from .bench import run_bench

    cfg = _cfg(config, overrides)
    run_bench(cfg, batch_size=batch_size, steps=steps, warmup=warmup, out=out, console=console,
              policy=policy, num_classes=num_classes, e2e=e2e, e2e_dir=e2e_dir, torch_compile=torch_compile)


@data_app.command("check")
def data_check(path: Path = typer.Argument(..., help="Data root or task folder."),
               kind: Optional[str] = typer.Option(None, "--kind", help="vtab|fgvc|hta|imagefolder (auto)."),
               task: Optional[str] = typer.Option(None, "--task")):
    """Report classes, per-split counts and broken files of a data set."""
    from .data import check_dataset

    report = check_dataset(path, kind=kind, task=task)
    console.print(report.render())
    for p in report.problems:
        console.print(f"[red]problem:[/red] {p}")
    for b in report.broken:
        console.print(f"[red]broken:[/red] {b}")
    if not report.ok:
        raise PfnasError(f"{path}: {len(report.problems)} problem(s), {len(report.broken)} broken file(s)")


@baseline_app.command("fixed")
def baseline_fixed(op: str = typer.Option(..., "--op", help="prepend|add|affine|cross_attn (prepend = VPT-deep)."),
                   config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = SetOpt,
                   seeds: int = typer.Option(1, "--seeds"), out: Optional[Path] = OutOpt,
                   tracking_uri: Optional[str] = TrackOpt, experiment: Optional[str] = ExpOpt):
    """Retrain a single-op policy on every layer."""
    from .methods import fixed_baseline

    cfg = _cfg(config, overrides)
    _print_seeds(fixed_baseline(cfg, op, seeds=seeds, out_dir=_out(cfg, out, f"-fixed-{op}"),
                                runner=_runner(tracking_uri, experiment, "baseline fixed")))


@baseline_app.command("probe")
def baseline_probe(config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = SetOpt,
                   seeds: int = typer.Option(1, "--seeds"), out: Optional[Path] = OutOpt,
                   tracking_uri: Optional[str] = TrackOpt, experiment: Optional[str] = ExpOpt):
    """Linear probe: head only on the frozen CLS feature."""
    from .methods import fixed_baseline

    cfg = _cfg(config, overrides)
    _print_seeds(fixed_baseline(cfg, "none", seeds=seeds, out_dir=_out(cfg, out, "-probe"),
                                runner=_runner(tracking_uri, experiment, "baseline probe")))


@baseline_app.command("random")
def baseline_random(config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = SetOpt,
                    samples: int = typer.Option(8, "--samples", help="Policies sampled."),
                    weight_sharing: bool = _flag(False, "--weight-sharing/--no-weight-sharing"),
                    out: Optional[Path] = OutOpt, tracking_uri: Optional[str] = TrackOpt,
                    experiment: Optional[str] = ExpOpt):
    """Random search over layer policies under the differentiable search's budget."""
    from .methods import random_search

    cfg = _cfg(config, overrides)
    out_dir = _out(cfg, out, "-random")
    _print_result(random_search(cfg, samples=samples, weight_sharing=weight_sharing, out_dir=out_dir,
                                runner=_runner(tracking_uri, experiment, "baseline random")), out_dir)


@baseline_app.command("evolution")
def baseline_evolution(config: Optional[Path] = ConfigOpt, overrides: Optional[List[str]] = SetOpt,
                       population: int = typer.Option(6, "--population"), sample: int = typer.Option(3, "--sample"),
                       cycles: int = typer.Option(12, "--cycles"), out: Optional[Path] = OutOpt,
                       tracking_uri: Optional[str] = TrackOpt, experiment: Optional[str] = ExpOpt):
    """Regularized (aging) evolution over layer policies under the same budget."""
    from .methods import regularized_evolution

    cfg = _cfg(config, overrides)
    out_dir = _out(cfg, out, "-evolution")
    _print_result(regularized_evolution(cfg, population=population, sample=sample, cycles=cycles, out_dir=out_dir,
                                        runner=_runner(tracking_uri, experiment, "baseline evolution")), out_dir)


def _usage_errors() -> tuple[type, ...]:
    """ClickException classes of the click typer uses: vendored ``typer._click`` (typer >= 0.26) or ``click``."""
    found = []
    for mod in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(__import__(mod, fromlist=["ClickException"]).ClickException)
        except (ImportError, AttributeError):
            pass
    return tuple(found)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that checkpoints and MLflow runs close the same way."""


def _on_sigterm(signum, frame):
    global _terminated
    _terminated = True
    raise _Terminated()


_terminated = False


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point: user errors are one ``pfnas: error:`` line and exit 2; Ctrl-C exits 130, SIGTERM 143."""
    global _terminated
    _terminated = False
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread
        previous = None
    try:
        rc = _run_app(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if rc in (130, 143):  # typer turns KeyboardInterrupt into exit code 130 itself
        rc = 143 if _terminated else 130
        print(f"pfnas: {'terminated' if rc == 143 else 'interrupted'}; rerun the same command to resume from "
              "the last checkpoint", file=sys.stderr)
    return rc


def _run_app(argv: Optional[List[str]]) -> int:
    def error(msg: object) -> int:
        print(f"pfnas: error: {' '.join(str(msg).split())}", file=sys.stderr)
        return 2

    try:
        rc = app(args=argv, prog_name="pfnas", standalone_mode=False)
    except PfnasError as e:
        return error(e)
    except (typer.Exit, SystemExit) as e:
        code = getattr(e, "exit_code", getattr(e, "code", 0))
        return code if isinstance(code, int) else (0 if code is None else 1)
    except (KeyboardInterrupt, typer.Abort):
        return 130
    except _usage_errors() as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `pfnas` / `pfnas data`: show the help
            text = e.ctx.get_help() if getattr(e, "ctx", None) else e.format_message()
            if text:  # typer's rich help prints itself and returns ""
                print(text, file=sys.stderr)
            return 2
        return error(e.format_message())
    except OSError as e:  # output or input files the OS refuses (permissions, a file where a folder should be)
        if e.filename is None:
            raise
        return error(f"{e.filename}: {e.strerror or e}")
    # standalone_mode=False: typer returns the code of typer.Exit (and 130 for Ctrl-C) instead of raising it
    return rc if isinstance(rc, int) and not isinstance(rc, bool) else 0


if __name__ == "__main__":
    sys.exit(main())
