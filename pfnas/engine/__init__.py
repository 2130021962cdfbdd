"""Training engine: bilevel search, discretization, retraining, evaluation, checkpoint/resume.

No Ray or MLflow here: the orchestration layer drives :func:`run_experiment` (or the phases directly) through
the ``on_epoch`` callback and the checkpoint files the engine writes. ``phases``: the training loop and its
phases; ``oneshot``: the one-shot supernet (fair / uniform paths); ``selection``: the policy readouts of a searched
supernet; ``experiment``: output folders and runs.
"""
from ..runtime import autocast, resolve_device, rng_state, seed_everything, set_rng_state
from .experiment import (Experiment, ExperimentResult, RunDirClaim, backbone_param_count, claim_run_dir,
                         inference_throughput, run_experiment, run_retrain, run_search, shared_search, waiting_lock)
from .oneshot import SUPERNET_PATHS, OneShotPhase, inherited_score, inherited_state
from .phases import (EpochCallback, Phase, RetrainPhase, SearchPhase, eval_logits, evaluate, fit, lr_at, temperature)
from .selection import (PIN_LOGIT, parsimonious_choice, parsimony_policy, perturbation_policy, select_policy)

__all__ = ["EpochCallback", "Experiment", "ExperimentResult", "OneShotPhase", "PIN_LOGIT", "Phase", "RetrainPhase",
           "RunDirClaim", "SUPERNET_PATHS", "SearchPhase", "autocast", "backbone_param_count", "claim_run_dir",
           "eval_logits", "evaluate", "fit", "inference_throughput", "inherited_score", "inherited_state", "lr_at", "parsimonious_choice",
           "parsimony_policy", "perturbation_policy", "resolve_device", "rng_state", "run_experiment", "run_retrain",
           "run_search", "seed_everything", "select_policy", "set_rng_state", "shared_search",
           "temperature", "waiting_lock"]
