"""Steady-state training steps never wait for the device: no .item()/bool()/tolist() per step."""
from __future__ import annotations

import sys

import pytest
import torch

from conftest import DIVERGING_BACKBONE, tiny_config
from pfnas.engine import Experiment, RetrainPhase, SearchPhase

SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu")


@pytest.fixture
def count_syncs(monkeypatch):
    """Count calls, from pfnas or timm code, of the Tensor methods that read a value back to the host (on
    CUDA each waits for the stream). torch's own reads of CPU-side counters (optimizer steps) are not syncs."""
    calls: list[str] = []
    for name in SYNCS:
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _real=real, _name=name, **kw):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith(("pfnas", "timm")):
                calls.append(f"{_name} in {caller}:{sys._getframe(1).f_lineno}")
            return _real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return calls


def _steps(phase, step, n_warm=2, n=4):
    batches = list(phase._train_batches()) * 3
    xs = [(x.to(phase.device), y.to(phase.device)) for x, y in batches[: n_warm + n]]
    for x, y in xs[:n_warm]:
        step(x, y)
    return xs[n_warm:]


@pytest.mark.parametrize("policy", [["prepend", "affine"], ["add", "cross_attn"]])
def test_retrain_step_has_no_host_sync(count_syncs, policy):
    cfg = tiny_config(prompts={"length": 4, "dropout": 0.1, "fusion_dim": 4}, data={"synthetic_per_class": 64})
    exp = Experiment.build(cfg)
    phase = RetrainPhase(cfg, exp.fixed(policy), exp.data, exp.device)
    steady = _steps(phase, phase._weight_step)
    count_syncs.clear()
    for x, y in steady:
        phase._weight_step(x, y)
    assert count_syncs == []


@pytest.mark.parametrize("mode,per_step", [("softmax", 0), ("gumbel", 2)])
def test_search_step_syncs(count_syncs, mode, per_step):
    """Soft search: none. Single path: one read of the sampled path per forward (weight + arch)."""
    cfg = tiny_config(search={"mode": mode, "epochs": 2, "optim": {"lr": 1.0, "warmup_epochs": 0}},
                      data={"synthetic_per_class": 64})
    exp = Experiment.build(cfg)
    phase = SearchPhase(cfg, exp.supernet(), exp.data, exp.device)

    def step(x, y):
        phase._arch_step(x, y, x, y)
        phase._weight_step(x, y)

    steady = _steps(phase, step)
    count_syncs.clear()
    for x, y in steady:
        step(x, y)
    assert len(count_syncs) == per_step * len(steady), count_syncs


def test_nan_is_still_caught_without_per_step_syncs(tmp_path):
    from pfnas.config import TrainingError
    from pfnas.engine import run_retrain

    cfg = tiny_config(backbone=DIVERGING_BACKBONE, train={"epochs": 2, "optim": {"grad_clip": None}})
    with pytest.raises(TrainingError, match="non-finite loss in retrain epoch 1"):
        run_retrain(Experiment.build(cfg), ["add", "add"], tmp_path)
    assert not (tmp_path / "retrain.pt").exists()  # no checkpoint of a diverged epoch
