"""The selection protocol: trials score val and never read test; finals train on train+val and test once."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import pfnas.methods as bl
from conftest import UNSELECTABLE_METRICS, tiny_config
from pfnas.config import ConfigError, merge_dotted
from pfnas.data import TaskData
from pfnas.engine import Experiment, run_experiment

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def reads(monkeypatch):
    """Names of the splits every ``TaskData.batches`` call reads, in order."""
    seen: list[str] = []
    real = TaskData.batches

    def spy(self, split, *a, **kw):
        seen.append(split)
        return real(self, split, *a, **kw)

    monkeypatch.setattr(TaskData, "batches", spy)
    return seen


@pytest.mark.parametrize("method", [{"kind": "search"}, {"kind": "fixed", "op": "affine"}, {"kind": "probe"},
                                    {"kind": "random", "samples": 2},
                                    {"kind": "evolution", "population": 2, "sample_size": 1},
                                    {"kind": "oneshot", "budget_images": 2000, "rungs": [1, 2], "top_k": 1,
                                     "population": 3, "generations": 1, "tau_policies": 2, "select_folds": 2}])
@pytest.mark.slow
def test_select_stage_never_reads_test(exp, reads, tmp_path, method):
    cfg = tiny_config(method=method, train={"stage": "select", "epochs": 2})
    res = bl.run_method(cfg, tmp_path, exp=Experiment(cfg, exp.backbone, exp.data, exp.device))
    assert "test" not in reads and "trainval" not in reads
    assert res["test_acc"] is None and 0.0 <= res["val_acc"] <= 1.0
    assert res["val_acc"] == res["retrain_history"][-1]["val_acc"]  # the retrained policy's score, not selection's
    assert [h.get("val_acc") is not None for h in res["retrain_history"]] == [True, True]  # val curve per epoch


def test_final_stage_trains_on_trainval_and_tests_once(exp, reads, tmp_path):
    cfg = tiny_config(train={"epochs": 3})
    res = run_experiment(cfg, tmp_path, exp=Experiment(cfg, exp.backbone, exp.data, exp.device))
    assert reads.count("test") == 1 and "trainval" in reads
    assert [("test_acc" in h) for h in res.retrain_history] == [False, False, True]
    assert res.val_acc is None and res.test_acc == res.retrain_history[-1]["test_acc"]
    reads.clear()
    curve = merge_dotted(cfg, {"train.test_every": 1})  # opt-in test curve, for plots
    run_experiment(curve, tmp_path / "curve", exp=Experiment(curve, exp.backbone, exp.data, exp.device))
    assert reads.count("test") == 3


def test_fixed_method_runs_an_explicit_policy(exp, tmp_path):
    cfg = tiny_config(method={"kind": "fixed", "policy": ["cross_attn", "none"]}, train={"epochs": 1})
    res = bl.run_method(cfg, tmp_path, exp=Experiment(cfg, exp.backbone, exp.data, exp.device))
    assert res["policy"] == {"0": "cross_attn", "1": "none"}
    bad = tiny_config(method={"kind": "fixed", "policy": ["add"]})
    with pytest.raises(Exception, match="names 1 ops; the backbone has 2"):
        bl.run_method(bad, tmp_path / "bad", exp=Experiment(bad, exp.backbone, exp.data, exp.device))
    with pytest.raises(ConfigError, match="method.policy"):
        merge_dotted(cfg, {"method.policy": ["prepend", "bogus"]})


NOT_RESULTS = {"width-proxy.yaml"}  # measures slot occupancy of task studies (docs/results/width.md), not accuracy


def test_no_shipped_space_selects_on_test():
    from pfnas.tune import SpaceConfig, load_space, reads_test
    from pfnas.config import read_yaml

    spaces = sorted((REPO / "search_spaces").glob("*.yaml"))
    assert len(spaces) >= 6
    for path in spaces:
        space = SpaceConfig.model_validate(read_yaml(path))
        assert not any(reads_test(m) for m in space.metrics + [space.scheduler.metric]), path.name
        if path.name not in NOT_RESULTS:
            assert space.final.seeds >= 3, path.name
        _, plans = load_space(path)
        assert all(p.base.train.stage == "select" and p.base.train.test_every is None for p in plans), path.name


@pytest.mark.parametrize("field,value", [("metric", "test_acc"), ("metric", "retrain/test_acc"),
                                         ("scheduler", {"type": "asha", "metric": "test_loss"})])
def test_space_selecting_on_test_is_refused(tmp_path, field, value):
    import yaml

    from pfnas.tune import load_space

    space = {"name": "s", "params": {"search.arch_lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2}},
             field: value}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(space))
    with pytest.raises(ConfigError, match="reads the test split"):
        load_space(path)
    space.pop(field)
    space["params"]["train.stage"] = {"type": "choice", "values": ["final"]}
    path.write_text(yaml.safe_dump(space))
    with pytest.raises(ConfigError, match="train.stage is set by the study"):
        load_space(path)


@pytest.mark.parametrize("space_fields,match", UNSELECTABLE_METRICS)
def test_space_metric_that_cannot_select_the_best_trial_is_refused(tmp_path, space_fields, match):
    """A mode against its metric's direction would pick the worst trial and exit 0; a misspelt metric would run
    the whole study and then select nothing. Both are refused before any trial runs."""
    import yaml

    from pfnas.tune import load_space

    space = {"name": "s", "params": {"search.arch_lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2}},
             **space_fields}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(space))
    with pytest.raises(ConfigError, match=re.escape(match)):
        load_space(path)


@pytest.mark.parametrize("space_fields", [{"metric": "val_loss", "mode": "min"},
                                          {"metric": ["val_acc", "infer_ms_per_image"], "mode": ["max", "min"]},
                                          {"metric": "retrain/val_acc"}, {"metric": "search/supernet_val_acc"}])
def test_space_metric_with_its_own_direction_is_accepted(space_fields):
    from pfnas.tune import SpaceConfig

    SpaceConfig.model_validate({"name": "s", "params": {"search.arch_lr": {"type": "choice", "values": [0.1]}},
                                **space_fields})


@pytest.mark.slow
def test_demo_space_search_decides(tmp_path):
    """The quick start shows a real search: at the low end of the demo's arch lr range, in softmax mode
    (the slower of its two modes), alpha leaves uniform (mean normalised entropy <= 0.7)."""
    from pfnas.engine import run_search
    from pfnas.tune import load_space

    space, (plan,) = load_space(REPO / "search_spaces" / "demo.yaml")
    cfg = merge_dotted(plan.base, {"search.arch_lr": space.params["search.arch_lr"].low, "search.mode": "softmax"})
    phase = run_search(Experiment.build(cfg), tmp_path)
    entropy = [h["alpha_entropy"] for h in phase.history]
    assert entropy[0] > entropy[-1] and entropy[-1] <= 0.7, entropy


def test_perturbation_selection_reads_val_only(exp, reads, tmp_path):
    """search.select=perturb picks each layer's op by supernet val accuracy with that op pinned: the chosen
    op's pinned score is the best of its layer, and only train/val are read."""
    from pfnas.engine import PIN_LOGIT, evaluate, run_search

    cfg = tiny_config(search={"select": "perturb", "epochs": 2, "optim": {"lr": 1.0, "warmup_epochs": 0}})
    phase = run_search(Experiment(cfg, exp.backbone, exp.data, exp.device), tmp_path)
    assert "test" not in reads and "trainval" not in reads
    model, policy = phase.model, phase.policy
    alpha = model.alpha.detach().clone()
    assert policy == {int(k): v for k, v in __import__("json").loads((tmp_path / "policy.json").read_text()).items()}
    with torch.no_grad():  # replay the last layer's decision with every earlier layer pinned as chosen
        for l in range(model.depth - 1):
            model.alpha[l].fill_(-PIN_LOGIT)
            model.alpha[l, model.candidates.index(policy[l])] = PIN_LOGIT
        last = model.depth - 1
        scores = []
        for i in range(len(model.candidates)):
            model.alpha[last].fill_(-PIN_LOGIT)
            model.alpha[last, i] = PIN_LOGIT
            scores.append(evaluate(model, exp.data, "val", 256, exp.device)["acc"])
        model.alpha.copy_(alpha)
    assert scores[model.candidates.index(policy[last])] == max(scores)


def test_parsimonious_choice_leaves_only_undetectable_differences_to_the_cost():
    """A cheaper op within z paired standard errors of the best is kept; one clearly worse is not."""
    from pfnas.engine import parsimonious_choice

    g = torch.Generator().manual_seed(0)
    base = torch.rand(200, generator=g) + 0.5

    def noise():  # zero mean exactly, so the offsets below are the mean differences
        n = 0.2 * torch.randn(200, generator=g)
        return n - n.mean()

    costs, alpha = torch.tensor([10.0, 1.0, 5.0]), torch.zeros(3)
    tied = torch.stack([base, base + 0.01 + noise(), base + 1.0])  # op 1 is 0.01 worse: under 1 SE (0.014)
    assert parsimonious_choice(tied, costs, alpha, z=2.0) == (1, [0, 1])
    assert parsimonious_choice(tied, costs, alpha, z=0.0)[0] == 0  # z = 0: the lowest mean loss
    clear = torch.stack([base, base + 0.3 + noise(), base + 1.0])  # op 1 is 0.3 worse, ~20 SEs
    assert parsimonious_choice(clear, costs, alpha, z=2.0) == (0, [0])
    # equal costs among the tied: the larger alpha decides
    assert parsimonious_choice(tied, torch.tensor([1.0, 1.0, 5.0]), torch.tensor([0.0, 0.5, 0.0]), 2.0)[0] == 1
    # a preferred op takes the tie over the cheaper one, but not a clear loss, and not a tie it is not in
    assert parsimonious_choice(tied, costs, alpha, z=2.0, prefer=0) == (0, [0, 1])
    assert parsimonious_choice(clear, costs, alpha, z=2.0, prefer=1) == (0, [0])
    assert parsimonious_choice(tied, costs, alpha, z=2.0, prefer=2) == (1, [0, 1])


def test_parsimony_selection_reads_val_only_and_follows_the_cost_when_nothing_is_significant(exp, reads, tmp_path):
    """search.select=parsimony: with an unreachable z every layer takes its cheapest op; with z = 0 each layer
    takes the op with the lowest pinned val loss (replayed for the last layer); the evidence is saved."""
    import json

    from pfnas.engine import PIN_LOGIT, run_search
    from pfnas.engine.selection import _pinned_scores

    def search(z, out):
        cfg = tiny_config(search={"select": "parsimony", "select_z": z, "epochs": 2,
                                  "optim": {"lr": 1.0, "warmup_epochs": 0}})
        return run_search(Experiment(cfg, exp.backbone, exp.data, exp.device), out)

    lax = search(100.0, tmp_path / "lax")
    cheapest = {l: lax.model.candidates[int(i)] for l, i in enumerate(lax.model.param_costs().argmin(-1).tolist())}
    assert lax.policy == cheapest
    sel = json.loads((tmp_path / "lax" / "selection.json").read_text())
    assert [d["pick"] for d in sel["layers"]] == [cheapest[l] for l in range(lax.model.depth)]
    assert all(len(d["tied"]) == len(lax.model.candidates) for d in sel["layers"])

    prefer = next(op for op in lax.model.candidates if op not in cheapest.values())  # never the cheapest
    cfg = tiny_config(search={"select": "parsimony", "select_z": 100.0, "select_prefer": prefer, "epochs": 2,
                              "optim": {"lr": 1.0, "warmup_epochs": 0}})
    preferred = run_search(Experiment(cfg, exp.backbone, exp.data, exp.device), tmp_path / "prefer")
    assert set(preferred.policy.values()) == {prefer}
    assert json.loads((tmp_path / "prefer" / "selection.json").read_text())["prefer"] == prefer
    for bad, fragment in (({"select_prefer": "affine"}, "set search.select parsimony"),
                          ({"select": "parsimony", "select_prefer": "bogus"}, "not a candidate op")):
        with pytest.raises(ValueError, match=fragment):
            tiny_config(search=bad)

    strict = search(0.0, tmp_path / "strict")
    assert "test" not in reads and "trainval" not in reads
    model, policy = strict.model, strict.policy
    with torch.no_grad():
        alpha = model.alpha.detach().clone()
        for l in range(model.depth - 1):
            model.alpha[l].fill_(-PIN_LOGIT)
            model.alpha[l, model.candidates.index(policy[l])] = PIN_LOGIT
        losses = _pinned_scores(model, exp.data, exp.device, "fp32", 64, model.depth - 1)[0].double().mean(-1)
        model.alpha.copy_(alpha)
    assert model.candidates[int(losses.argmin())] == policy[model.depth - 1]
