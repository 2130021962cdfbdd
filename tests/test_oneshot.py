"""method.kind oneshot: the fair supernet step, evolution on inherited weights, successive halving, K-fold, Kendall
tau, the budget plan, and the method end to end with resume."""
from __future__ import annotations

import json
import math
import random
import statistics
from collections import Counter

import pytest
import torch

import pfnas.methods as bl
import pfnas.methods.oneshot as osm
from conftest import tiny_config
from pfnas.config import ConfigError, PfnasError, load_config, merge_dotted, selection_hash
from pfnas.data import TaskData
from pfnas.engine import Experiment, OneShotPhase, inherited_state
from pfnas.model import PromptLayer
from pfnas.tracking import RunLogger, make_client
from pfnas.methods.budget import best_record, keep_top
from pfnas.methods.oneshot import (fold_assignment, fold_task, halving_schedule, kendall_tau, next_generation, oneshot_plan,
                                  policy_key, tau_ceiling)

OPS = ["prepend", "add", "affine", "cross_attn"]


def _exp(exp, **method):
    cfg = tiny_config(method={"kind": "oneshot", **method}, train={"stage": "select", "epochs": 2})
    return Experiment(cfg, exp.backbone, exp.data, exp.device)


def _phase(e, paths="fair"):
    model = e.supernet(per_op_prompts=True)
    return OneShotPhase(e.cfg, model, e.data, e.device, 1, paths)


def _batch(e):
    return next(iter(e.data.batches("train", 16)))


def test_fair_step_gradient_is_the_sum_of_single_path_gradients_and_the_mean_for_the_head(exp):
    """Prompt dropout is 0 in tiny_config: the K passes are deterministic and their gradients add up; the head,
    which every pass shares, gets their mean (one standalone step's size)."""
    e = _exp(exp)
    phase = _phase(e)
    model, (x, y) = phase.model, _batch(e)
    assert all(layer.per_op for layer in model.layers)  # each candidate op holds its own prompts
    paths = phase.step_paths()
    assert len(paths) == 4 and all(sorted(p[l] for p in paths) == [0, 1, 2, 3] for l in range(model.depth))
    params = model.weight_parameters()
    want = [torch.zeros_like(p) for p in params]
    for path in paths:
        model.path = path
        grads = torch.autograd.grad(phase._loss(x, y)[0], params, allow_unused=True)
        want = [w + (g if g is not None else 0) for w, g in zip(want, grads)]
    model.path = None
    phase.opt.zero_grad(set_to_none=True)
    phase.accumulate(x, y, paths)
    head = {id(p) for p in model.head.parameters()}
    assert len(head) == 2 and {id(p) for p in phase.shared} == head  # per-op prompts are not shared
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad if p.grad is not None else torch.zeros_like(p), w / 4 if id(p) in head else w)
    for layer in model.layers:  # every op trained: prepend's and add's own prompts, the zero-initialised maps of
        # affine (up) and cross_attn (o), which pass no gradient to their prompts yet
        g = layer.prompts.grad
        assert float(g[0].abs().sum()) > 0 and float(g[1].abs().sum()) > 0
        assert float(layer.ops[2].up.grad.abs().sum()) > 0 and float(layer.ops[3].o.weight.grad.abs().sum()) > 0
    phase._weight_step(x, y)
    assert phase.images == 4 * 16 and phase.step == 1  # K passes on 16 images count 64 training images


def test_fair_step_runs_every_op_of_every_layer_once_and_uniform_one_path(exp, monkeypatch):
    calls: list[tuple[int, int]] = []
    real = PromptLayer.run_op

    def counting(self, i, *a, **kw):
        calls.append((id(self), i))
        return real(self, i, *a, **kw)

    monkeypatch.setattr(PromptLayer, "run_op", counting)
    e = _exp(exp)
    for paths, per_layer in (("fair", 4), ("uniform", 1)):
        phase = _phase(e, paths)
        x, y = _batch(e)
        for _ in range(3):
            calls.clear()
            phase._weight_step(x, y)
            count = Counter(calls)
            layers = {id(layer) for layer in phase.model.layers}
            assert {k[0] for k in count} == layers
            for lid in layers:
                ops = [i for (l, i) in calls if l == lid]
                assert len(ops) == per_layer and len(set(ops)) == per_layer  # fair: each op exactly once
        assert phase.images == 3 * per_layer * 16


def test_next_generation_makes_new_valid_policies():
    parents = [{0: "prepend", 1: "add", 2: "affine"}, {0: "cross_attn", 1: "cross_attn", 2: "add"}]
    seen = {policy_key(p) for p in parents}
    kids = next_generation(parents, 6, 3, 0.5, OPS, random.Random(0), seen)
    assert len(kids) == 6 and len({policy_key(k) for k in kids}) == 6
    assert all(set(k) == {0, 1, 2} and set(k.values()) <= set(OPS) for k in kids)
    assert all(policy_key(k) in seen and policy_key(k) not in map(policy_key, parents) for k in kids)
    for k in kids[:3]:  # crossover children take every layer from one of the two parents
        assert all(k[l] in (parents[0][l], parents[1][l]) for l in k)
    assert next_generation(parents, 5, 5, 0.5, ["add"], random.Random(0), set()) != []  # one op: copies only once
    assert next_generation(parents[:1], 5, 5, 0.5, ["add"], random.Random(0), {("prepend", "add", "affine")}) == []


def test_inherited_evolution_respects_the_val_image_budget(exp, tmp_path, monkeypatch):
    e = _exp(exp, population=3, generations=5)
    phase = _phase(e)
    x, y = _batch(e)
    phase._weight_step(x, y)
    reads = []
    real = TaskData.batches
    monkeypatch.setattr(TaskData, "batches", lambda self, split, *a, **kw: reads.append(split) or real(self, split,
                                                                                                      *a, **kw))
    n_val = e.data.num_images("val")
    events: list[dict] = []
    recs = osm._inherited_evolution(e, phase.model, tmp_path, {}, 5 * n_val + n_val - 1, events.append)
    assert len(recs) == 5 and reads == ["val"] * 5  # the sixth would pass the budget: never scored
    assert [r["generation"] for r in recs] == [0, 0, 0, 1, 1]
    assert len({policy_key(r["policy"]) for r in recs}) == 5
    assert all(sorted(r["policy"]) == ["0", "1"] and set(r["policy"].values()) <= set(OPS) for r in recs)
    assert [m["eval_images"] for m in events] == [3 * n_val, 5 * n_val]
    st = json.loads((tmp_path / "state.json").read_text())
    assert st["evolution_done"] and "pending" not in st and st["inherited"] == recs


def _scripted_alone(monkeypatch, scores: dict) -> list:
    """Verification runs replaced by a table: (op of layer 0, epochs) -> (val_acc, val_loss); returns the list of
    the (op, epochs) runs asked for, in order."""
    trained = []

    def alone(exp_, out, st, policy, epochs, fold=None, supernet=None):
        trained.append((policy[0], epochs))
        acc, loss = scores[(policy[0], epochs)]
        return {"name": f"{policy[0]}-{epochs}", "val_acc": acc, "val_loss": loss, "images": 1, "time_s": 0.0,
                "n_val": 9}, True

    monkeypatch.setattr(osm, "_alone", alone)
    return trained


def test_successive_halving_keeps_the_best_by_val_acc_then_lower_val_loss(exp, tmp_path, monkeypatch):
    assert halving_schedule(5, [1, 2, 3], 2) == [5, 3, 2] and halving_schedule(5, [1, 2, 3], 3) == [5, 2, 1]
    assert halving_schedule(4, [1, 2, 3], 2) == [4, 2, 1] and halving_schedule(1, [1, 2], 2) == [1]
    assert halving_schedule(5, [4, 8], 1) == [5, 5]  # eta 1: every candidate at every rung
    recs = [{"val_acc": 0.5, "val_loss": 0.9}, {"val_acc": 0.7, "val_loss": 0.8}, {"val_acc": 0.5, "val_loss": 0.4},
            {"val_acc": 0.7, "val_loss": 0.2}]
    assert keep_top(recs, 3) == [recs[3], recs[1], recs[2]]
    scores = {  # (op of layer 0, epochs) -> (val_acc, val_loss): ties on acc at rung 0 decided by the loss
        ("prepend", 1): (0.6, 1.0), ("add", 1): (0.6, 0.5), ("affine", 1): (0.4, 0.1), ("cross_attn", 1): (0.6, 0.7),
        ("add", 2): (0.5, 0.3), ("cross_attn", 2): (0.5, 0.2)}
    trained = _scripted_alone(monkeypatch, scores)
    cands = [{0: op, 1: op} for op in OPS]
    hist = osm._verify(_exp(exp), tmp_path, {}, cands, [1, 2], None, 0, 100)
    assert trained == [(op, 1) for op in OPS] + [("add", 2), ("cross_attn", 2)]  # 4 -> ceil(4/2) = 2
    last = [h for h in hist if h["rung"] == 1]
    assert best_record(last)["policy"]["0"] == "cross_attn"  # equal accuracy, lower loss


def test_extrapolated_loss_ranks_by_the_val_loss_predicted_at_train_epochs(exp, tmp_path, monkeypatch):
    """rung_score extrapolated_loss: the first rung keeps the lowest val losses; the next one ranks each survivor
    by the line in log-epochs through its two runs' losses, read at train.epochs, so the op that is behind after a
    short run but improves fastest wins; no run beyond the rungs' is trained."""
    assert osm.extrapolated_loss((4, 1.0), (8, 0.8), 32) == pytest.approx(0.8 - 0.2 * 2)  # two doublings on
    assert osm.extrapolated_loss((4, 1.0), (8, 0.8), 8) == pytest.approx(0.8)  # the longer run already at target
    assert osm.extrapolated_loss((4, 1.0), (8, math.nan), 32) == math.inf
    scores = {  # (op, epochs) -> (val_acc, val_loss): prepend leads on acc at both rungs, affine improves fastest
        ("prepend", 1): (0.7, 0.9), ("add", 1): (0.6, 1.2), ("affine", 1): (0.5, 1.1), ("cross_attn", 1): (0.6, 1.5),
        ("prepend", 2): (0.8, 0.8), ("affine", 2): (0.75, 0.85)}
    trained = _scripted_alone(monkeypatch, scores)
    e = Experiment(tiny_config(method={"kind": "oneshot", "rung_score": "extrapolated_loss", "rungs": [1, 2]},
                               train={"stage": "select", "epochs": 8}), exp.backbone, exp.data, exp.device)
    hist = osm._verify(e, tmp_path, {}, [{0: op, 1: op} for op in OPS], [1, 2], None, 0, 100)
    assert trained == [(op, 1) for op in OPS] + [("prepend", 2), ("affine", 2)]  # kept by loss (acc would keep add)
    last = {h["policy"]["0"]: h["score"] for h in hist if h["rung"] == 1}
    assert last == pytest.approx({"prepend": 0.8 - 0.1 * 2, "affine": 0.85 - 0.25 * 2})  # to 8 epochs: 2 doublings
    assert max((h for h in hist if h["rung"] == 1), key=osm.rung_rank_key)["policy"]["0"] == "affine"
    scores.update({("add", 2): (0.6, 1.1), ("cross_attn", 2): (0.5, 1.0)})  # the worst at 1 epoch falls fastest
    e1 = Experiment(merge_dotted(e.cfg, {"method.eta": 1}), exp.backbone, exp.data, exp.device)
    hist = osm._verify(e1, tmp_path, {}, [{0: op, 1: op} for op in OPS], [1, 2], None, 0, 100)
    assert len([h for h in hist if h["rung"] == 1]) == 4  # eta 1: every candidate gets both runs
    assert max((h for h in hist if h["rung"] == 1), key=osm.rung_rank_key)["policy"]["0"] == "cross_attn"
    for bad in ({"rungs": [4]}, {"select_folds": 5}):
        with pytest.raises(ConfigError, match="extrapolated_loss"):
            load_config(None, ["method.kind=oneshot", "method.rung_score=extrapolated_loss"]
                        + [f"method.{k}={json.dumps(v)}" for k, v in bad.items()])
    with pytest.raises(PfnasError, match="needs two rungs"):
        oneshot_plan(tiny_config(method={"kind": "oneshot", "rung_score": "extrapolated_loss", "rungs": [2, 4]},
                                 train={"epochs": 2}), exp.data, 10**6)


def test_inherited_state_gives_the_fixed_model_the_supernets_path(exp):
    """The fixed model of a policy, loaded with the supernet's weights of that path, computes what the supernet
    pinned to the path computes (eval mode); one trained step first, so no weight is still at its init."""
    e = _exp(exp)
    phase = _phase(e)
    x, y = _batch(e)
    phase._weight_step(x, y)
    sup = phase.model.eval()
    for policy in ({0: "affine", 1: "cross_attn"}, {0: "prepend", 1: "add"}):
        fixed = e.fixed(policy)
        before = fixed.eval()(x)
        fixed.load_trainable_state_dict(inherited_state(sup, policy))
        sup.path = [sup.candidates.index(policy[l]) for l in range(sup.depth)]
        with torch.no_grad():
            want, got = sup(x), fixed(x)
        sup.path = None
        torch.testing.assert_close(got, want)
        assert not torch.allclose(before, want)
    with pytest.raises(PfnasError, match="not a candidate"):
        inherited_state(sup, {0: "none", 1: "add"})
    with pytest.raises(PfnasError, match="supernet"):
        inherited_state(e.fixed({0: "add", 1: "add"}), {0: "add", 1: "add"})


def test_verification_starts_from_inherited_weights_unless_scratch(exp, tmp_path, monkeypatch):
    """verify_init inherited: each candidate's first step starts from the supernet's path (its val score before
    training is the supernet's inherited score); scratch: from a fresh init; the runs are kept apart by name."""
    starts: list[torch.Tensor] = []
    real = osm.train_candidate

    def spy(exp_, policy, folder, steps, init=None):
        starts.append(None if init is None else init["layers.0.prompts"])
        return real(exp_, policy, folder, steps, init)

    monkeypatch.setattr(osm, "train_candidate", spy)
    e = _exp(exp)
    phase = _phase(e)
    phase._weight_step(*_batch(e))
    cands = [{0: "affine", 1: "add"}, {0: "prepend", 1: "prepend"}]
    hist = osm._verify(e, tmp_path / "inh", {}, cands, [1], None, 0, 10**6, phase.model)
    assert [h["runs"][0].endswith("-inh") for h in hist] == [True, True]
    torch.testing.assert_close(starts[0], phase.model.layers[0].prompts[2])  # affine's own prompts of layer 0
    torch.testing.assert_close(starts[1], phase.model.layers[0].prompts[0])
    starts.clear()
    hist = osm._verify(e, tmp_path / "scratch", {}, cands, [1], None, 0, 10**6, None)
    assert starts == [None, None] and not any(h["runs"][0].endswith("-inh") for h in hist)
    with pytest.raises(PfnasError, match="from scratch"):
        osm._alone(e, tmp_path, {}, cands[0], 1, (0, e), supernet=phase.model)


def test_kfold_splits_train_and_val_only_stratified(exp):
    data = exp.data
    n_tr, n_va = data.num_images("train"), data.num_images("val")
    labels = torch.cat([data.split("train").labels, data.split("val").labels])
    assign = fold_assignment(labels, 3, 0)
    assert sorted(Counter(assign.tolist()).values()) == [16, 16, 16]
    for c in labels.unique():  # each class spread over the folds (at most one apart)
        per = Counter(assign[labels == c].tolist())
        assert max(per.values()) - min(per.values()) <= 1
    sizes = 0
    for k in range(3):
        t = fold_task(data, k, 3, 0)
        assert set(t.splits) == {"train", "val"}  # no test in it
        assert t.num_images("train") + t.num_images("val") == n_tr + n_va
        sizes += t.num_images("val")
    assert sizes == n_tr + n_va
    with pytest.raises(PfnasError, match="exceeds"):
        fold_assignment(labels, 100, 0)


def test_mixed_tau_policies_spread_their_op_shares():
    """tau_sample mixed: each policy draws its own op shares, so the sample holds near-single-op policies and
    blends (a wider spread of standalone scores), where uniform policies hold about a quarter of each op."""
    from pfnas.methods.discrete import sample_policies

    def top_share(pols):
        return [max(Counter(p.values()).values()) / 12 for p in pols]

    mixed = osm.mixed_policies(64, 12, OPS, random.Random(0))
    uniform = sample_policies(64, 12, OPS, random.Random(0))
    assert len({policy_key(p) for p in mixed}) == 64 and all(set(p) == set(range(12)) for p in mixed)
    assert statistics.fmean(top_share(mixed)) > statistics.fmean(top_share(uniform)) + 0.15
    assert max(top_share(mixed)) >= 11 / 12 and max(top_share(uniform)) <= 8 / 12
    assert osm.mixed_policies(8, 12, OPS, random.Random(0)) == mixed[:8]  # seeded
    assert len(osm.mixed_policies(16, 1, OPS, random.Random(0))) == 16  # the space (4) is smaller: repeats allowed


def test_kendall_tau_b_by_hand():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # 4 concordant, 0 discordant, one pair tied in x only, one in y only: 4 / sqrt(5 * 5)
    assert kendall_tau([1, 2, 2, 3], [1, 3, 2, 3]) == pytest.approx(0.8)
    assert kendall_tau([1, 1, 2], [1, 2, 2]) == pytest.approx(0.5)  # 1 / sqrt(2 * 2)
    assert kendall_tau([1, 2, 3], [3, 1, 1]) == pytest.approx(-2 / math.sqrt(6))  # 2 discordant, one y tie
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)  # 5 C, 1 D
    assert kendall_tau([0.5, 0.5], [1, 2]) is None and kendall_tau([1], [2]) is None
    with pytest.raises(PfnasError, match="paired"):
        kendall_tau([1, 2], [1])


def test_tau_ceiling_follows_the_share_of_variance_above_val_noise():
    spread = [0.2, 0.4, 0.6, 0.8]  # var 0.0667 against a binomial var of 0.2 / n
    assert tau_ceiling(spread, 100_000) == pytest.approx(1.0, abs=0.01)
    r = 1 - statistics.fmean(a * (1 - a) for a in spread) / 200 / statistics.variance(spread)
    assert tau_ceiling(spread, 200) == pytest.approx(2 / math.pi * math.asin(math.sqrt(r)))
    assert tau_ceiling([0.60, 0.62, 0.61, 0.63], 200) == 0.0  # a 1-point spread is all val noise at n = 200
    assert tau_ceiling([0.5, 0.5, 0.5], 200) is None and tau_ceiling([0.5, 0.6], 200) is None


def test_budget_plan_and_config_bounds(exp):
    cfg = tiny_config(method={"kind": "oneshot", "rungs": [1, 2, 5], "top_k": 1}, train={"epochs": 2})
    # rungs capped by train.epochs: [1, 2]; 5 candidates at most: 5 x 1 + 3 x 2 epochs of 32 images = 352;
    # a fair supernet epoch: 4 ops x 2 steps x 16 = 128 images; budget 1000 -> 5 epochs
    plan = oneshot_plan(cfg, exp.data, 1000)
    assert plan["rungs"] == [1, 2] and plan["verification_images_max"] == 352
    assert plan["supernet_epochs"] == 5 and plan["supernet_epoch_images"] == 128
    with pytest.raises(PfnasError, match="cannot train the one-shot plan"):
        oneshot_plan(cfg, exp.data, 400)
    for bad in ({"rungs": [3, 2]}, {"rungs": []}, {"top_k": 0}, {"select_folds": 1}, {"eta": 0}, {"tau_supernets": ["fair", "fair"]},
                {"mutation_prob": 0}, {"supernet": "darts"}):
        with pytest.raises(ConfigError):
            load_config(None, ["method.kind=oneshot"] + [f"method.{k}={json.dumps(v)}" for k, v in bad.items()])


@pytest.mark.slow
def test_oneshot_end_to_end_costs_diagnostics_and_resume(exp, tmp_path, monkeypatch):
    method = {"kind": "oneshot", "budget_images": 1000, "rungs": [1, 2], "top_k": 1, "population": 3,
              "generations": 1, "tau_policies": 3, "tau_supernets": ["fair", "uniform", "darts"]}
    e = _exp(exp, **method)
    seen: list[dict] = []
    uri = f"sqlite:///{tmp_path}/m.db"
    lg = RunLogger(uri, "oneshot", "run", e.cfg, retry_s=0.0)
    ref = bl.run_method(e.cfg, tmp_path / "ref", lambda m: seen.append(m) or lg.log_epoch(m), exp=e)
    lg.finish(ref)
    client = make_client(uri)
    metrics = client.get_run(lg.run_id).data.metrics
    assert len(client.get_metric_history(lg.run_id, "supernet/train_loss")) == ref["cost_breakdown"]["supernet_epochs"]
    assert len(client.get_metric_history(lg.run_id, "oneshot_verify/val_acc")) == len(ref["history"])
    assert metrics["cost_images"] == ref["cost_images"] and metrics["eval_images"] == ref["eval_images"]
    assert ("kendall_tau" in metrics) == (ref["kendall_tau"] is not None)  # undefined on a constant ranking
    assert any(k.startswith("oneshot/pref_l0_") for k in metrics) and "oneshot_evolution/best_val_acc" in metrics
    assert any("select_epochs_done" in m for m in seen) and not any("select_epochs" in k for k in metrics)  # live only
    assert set(ref["policy"]) == {"0", "1"} and ref["policy"] in ref["candidates"]
    assert ref["verify_init"] == "inherited" and all(n.endswith("-inh") for h in ref["history"] for n in h["runs"])
    assert not any(n.endswith("-inh") for n in ref["tau_runs"])  # tau's standalone runs start from scratch
    assert len(ref["candidates"]) in (4, 5)  # the top-1 inherited policy and the single-op policies
    last = [h for h in ref["history"] if h["rung"] == max(h["rung"] for h in ref["history"])]
    assert ref["select_val_acc"] == best_record(last)["val_acc"] and 0 <= ref["val_acc"] <= 1
    cb = ref["cost_breakdown"]
    assert cb["supernet_images"] == cb["supernet_epochs"] * 128 and cb["supernet_passes"] == 4
    assert ref["cost_images"] == cb["supernet_images"] + cb["verification_images"] <= ref["budget_images"] == 1000
    assert ref["inherited_eval_images"] <= ref["eval_budget_images"] and ref["cost_step_s"] > 0
    assert set(ref["kendall_tau_by_supernet"]) == {"fair", "uniform", "darts"} and ref["tau_rung_epochs"] == 2
    assert ref["kendall_tau"] == ref["kendall_tau_by_supernet"]["fair"] and ref["tau_policies"] == 3
    assert ref["tau_ceiling"] is None or 0 <= ref["tau_ceiling"] <= 1
    assert (tmp_path / "ref" / "tau_uniform" / "supernet.pt").is_file() and (tmp_path / "ref" / "tau_darts").is_dir()
    pref = ref["layer_preference"]["0"]
    assert set(pref) == set(OPS) and sum(v["n"] for v in pref.values()) >= 3
    phases = {m["phase"] for m in seen}
    assert {"supernet", "oneshot_evolution", "oneshot_verify", "oneshot", "retrain"} <= phases
    assert json.loads((tmp_path / "ref" / "result.json").read_text())["policy"] == ref["policy"]

    class Stop(Exception):
        pass

    def stop_at_second_candidate(m):
        if m["phase"] == "oneshot_verify" and m["candidate"] == 1:
            raise Stop

    with pytest.raises(Stop):
        bl.run_method(e.cfg, tmp_path / "run", stop_at_second_candidate, exp=e)
    trained = []
    real = osm.train_candidate
    monkeypatch.setattr(osm, "train_candidate", lambda *a: trained.append(a[2].name) or real(*a))
    res = bl.run_method(e.cfg, tmp_path / "run", exp=e)
    assert len(trained) == len(set(trained)) and not any(n in trained for n in ref["history"][0]["runs"])
    drop = ("time_s",)
    for key in ("policy", "select_val_acc", "val_acc", "cost_images", "kendall_tau_by_supernet", "inherited"):
        assert res[key] == ref[key], key
    assert [{k: v for k, v in h.items() if k not in drop} for h in res["history"]] == \
        [{k: v for k, v in h.items() if k not in drop} for h in ref["history"]]


def test_a_retrain_lr_grid_shares_one_oneshot_selection(exp, tmp_path):
    e = _exp(exp, budget_images=1000, rungs=[1, 2], top_k=1, population=3, generations=1, tau_policies=0)
    b = Experiment(merge_dotted(e.cfg, {"train.optim.lr": 2.0}), exp.backbone, exp.data, exp.device)
    ra = bl.run_method(e.cfg, tmp_path / "a", exp=e, search_cache=tmp_path / "cache")
    rb = bl.run_method(b.cfg, tmp_path / "b", exp=b, search_cache=tmp_path / "cache")
    (slot,) = (tmp_path / "cache").iterdir()
    assert slot.name.startswith("oneshot-") and (tmp_path / "b" / "state.json").is_file()
    assert rb["history"] == ra["history"] and rb["policy"] == ra["policy"] and ra["kendall_tau"] is None
    other = merge_dotted(e.cfg, {"train.epochs": 1})  # caps the rungs: another selection
    assert selection_hash(other) != selection_hash(e.cfg) == selection_hash(b.cfg)
    # every field the one-shot reads is its selection's identity (verify_init and tau_epochs once were not, so a
    # scratch-verified run reused an inherited one's selection and shared its config hash in MLflow)
    for change in ({"method.verify_init": "scratch"}, {"method.tau_epochs": 3}, {"method.select_folds": 2},
                   {"method.rungs": [1, 3]}, {"method.mutation_prob": 0.5}, {"method.rung_score": "extrapolated_loss"},
                   {"method.tau_sample": "mixed"}):
        assert selection_hash(merge_dotted(e.cfg, change)) != selection_hash(e.cfg), change
