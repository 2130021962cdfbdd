"""Ray Tune studies over the outer hyperparameters of an experiment, with Optuna TPE and MLflow.

A *space* YAML (``search_spaces/*.yaml``, schema :class:`SpaceConfig`) names a base
:class:`~pfnas.config.ExperimentConfig` and distributions over dotted config keys. :func:`run_tune`
runs one Tune study per space (or one per entry of ``tasks``): every trial builds its config
(base + ``--set`` overrides + sampled values), runs :func:`pfnas.methods.run_method` (or the engine's
``run_experiment`` when baselines are absent) in its own directory, reports every epoch to Tune with a
checkpoint of that directory (so a restored trial resumes mid-phase), and logs to a nested MLflow run
under the study's parent run.

Reproducibility: the TPE sampler is seeded and, with ``sync_batches`` (default), configs are suggested
in synchronous batches of ``max_concurrent_trials``, so the sampler's history at every suggestion and
therefore the sequence of configs do not depend on which trial happens to finish first.

Metrics reported per epoch: every scalar as ``<phase>/<name>`` (latest value of each, carried across
phases), ``val_acc`` (latest search validation accuracy), ``test_acc`` (retrain epochs), ``restored``;
the final report adds ``test_acc``, ``tuned_params``, ``tuned_percent``, ``cost_images`` and ``complete``.
A trial whose loss turns non-finite fails the same way on every try: it ends with a report carrying ``error``
(and no metric), its MLflow run FAILED, instead of raising (which Ray would retry under ``max_failures``).
The study metric is only reported once it is real, so Tune's strict metric check is turned off."""
from __future__ import annotations

from ..tracking import reads_test
from .space import FinalSpec, ParamSpec, SpaceConfig, StudyPlan, load_space
from .study import PfnasOptunaSearch, run_tune
from .display import StudySummary, TuneSummary
from .select import FinalsRecord, TrialRecord
from .trial import EXPERIMENT_CACHE, TrialContext, pfnas_trial, readable_name, run_trial_method

__all__ = [
    "FinalSpec",
    "EXPERIMENT_CACHE",
    "FinalsRecord",
    "ParamSpec",
    "PfnasOptunaSearch",
    "SpaceConfig",
    "StudyPlan",
    "StudySummary",
    "TrialContext",
    "TrialRecord",
    "TuneSummary",
    "load_space",
    "pfnas_trial",
    "readable_name",
    "reads_test",
    "run_trial_method",
    "run_tune",
]
