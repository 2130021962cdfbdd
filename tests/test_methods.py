"""Discrete baselines at the search's budget: fixed, probe, random (+ weight sharing), evolution, resume."""
from __future__ import annotations

import json
import random

import pytest
import torch

import pfnas.methods as bl
import pfnas.methods.discrete as discrete
from conftest import tiny_config
from pfnas.config import merge_dotted
from pfnas.engine import Experiment, SearchPhase, evaluate, run_search
from pfnas.methods.budget import best_record

N_TRAIN, BATCH = 39, 16  # tiny_config: 3 classes x 13 train images, batch 16


def _cfg(**method):
    return tiny_config(method=method)


def test_fixed_and_probe(tmp_path):
    fixed = bl.run_method(_cfg(kind="fixed", op="prepend"), tmp_path / "fixed")
    probe = bl.run_method(_cfg(kind="probe"), tmp_path / "probe")
    dim, classes, depth, m = 32, 3, 2, 4
    for r, op in ((fixed, "prepend"), (probe, "none")):
        assert r["policy"] == {"0": op, "1": op} and r["cost_images"] == 0 and r["seed"] == 0
        assert 0.0 <= r["test_acc"] <= 1.0 and len(r["retrain_history"]) == 2
        assert json.loads((tmp_path / ("fixed" if op == "prepend" else "probe") / "result.json").read_text())[
            "test_acc"] == r["test_acc"]
    assert fixed["val_loss"] is None  # stage final: no val split scored
    sel = bl.run_method(tiny_config(method={"kind": "probe"}, train={"epochs": 2, "stage": "select"}), tmp_path / "s")
    assert sel["val_loss"] == pytest.approx(sel["retrain_history"][-1]["val_loss"]) and sel["val_loss"] > 0
    assert probe["method"] == "probe" and probe["tuned_params"] == dim * classes + classes  # head only
    assert fixed["tuned_params"] == depth * m * dim + dim * classes + classes
    assert 0 < probe["tuned_percent"] < fixed["tuned_percent"]
    summary = bl.fixed_baseline(tiny_config(), "prepend", seeds=2, out_dir=tmp_path / "seeds")
    assert summary["seeds"] == [0, 1] and len(summary["test_accs"]) == 2
    assert summary["test_acc_mean"] == pytest.approx(sum(summary["test_accs"]) / 2)
    assert summary["test_acc_std"] == pytest.approx(abs(summary["test_accs"][0] - summary["test_accs"][1]) / 2 ** 0.5)


def test_search_cost_counts_what_the_search_draws(exp, tmp_path, monkeypatch):
    cfg = tiny_config(search={"arch_warmup_epochs": 1, "epochs": 3})
    e = Experiment(cfg, exp.backbone, exp.data, exp.device)
    seen = {"train": 0, "val": 0}
    weight_step, arch_step = SearchPhase._weight_step, SearchPhase._arch_step

    def count_weight(self, x, y):
        seen["train"] += len(y)
        return weight_step(self, x, y)

    def count_arch(self, xt, yt, xv, yv):
        seen["val"] += len(yv)
        return arch_step(self, xt, yt, xv, yv)

    monkeypatch.setattr(SearchPhase, "_weight_step", count_weight)
    monkeypatch.setattr(SearchPhase, "_arch_step", count_arch)
    run_search(e, tmp_path)
    cost = bl.search_cost(cfg, e.data)
    # 39 train / 9 val -> an alpha step every 39 // 9 = 4 weight steps: 1 of the 2 steps per epoch, 2 epochs
    assert (cost["train_images"], cost["val_images"]) == (seen["train"], seen["val"]) == (3 * 32, 2 * 1 * 9)
    every2 = tiny_config(search={"arch_every": 1, "epochs": 2, "order": 2})
    assert bl.search_cost(every2, e.data) == {"train_images": 64, "val_images": 36, "unrolled_images": 192,
                                              "total": 292}
    assert bl.budget_images(cfg, e.data) == cost["total"] == 3 * 32 + 2 * 9  # baselines get the search's cost


def test_arch_batch_size_sets_the_val_images_of_each_alpha_step(exp, tmp_path, monkeypatch):
    sizes = []
    arch_step = SearchPhase._arch_step

    def record(self, xt, yt, xv, yv):
        sizes.append(len(yv))
        return arch_step(self, xt, yt, xv, yv)

    monkeypatch.setattr(SearchPhase, "_arch_step", record)
    for vb, want in ((4, [4, 4]), (9, [9, 9]), (None, [9, 9])):  # 9 val images; None: data.batch_size (16)
        sizes.clear()
        cfg = tiny_config(search={"epochs": 2, "arch_every": 1, "arch_batch_size": vb})
        run_search(Experiment(cfg, exp.backbone, exp.data, exp.device), tmp_path / str(vb))
        assert sizes == want * 2  # 2 alpha steps per epoch (one per weight step), the val list cycled
        assert bl.search_cost(cfg, exp.data)["val_images"] == sum(sizes)


def test_random_search_respects_budget(tmp_path):
    cfg = _cfg(kind="random", samples=3, budget_multiplier=2.0)
    r = bl.run_method(cfg, tmp_path)
    budget = 2 * (2 * 32 + 2 * 9)  # 2 x the search's cost: 2 epochs x (2 steps x 16 + one alpha step on 9 val)
    assert r["budget_images"] == budget
    assert 0.75 * budget <= r["cost_images"] <= budget
    assert len(r["history"]) == 3 and [h["id"] for h in r["history"]] == [0, 1, 2]
    assert all(h["images"] == 3 * BATCH for h in r["history"])  # budget // (3 samples x 16) = 3 steps each
    assert len({tuple(sorted(h["policy"].items())) for h in r["history"]}) == 3  # distinct samples
    best = max(r["history"], key=lambda h: h["val_acc"])
    assert r["policy"] == best["policy"] and r["select_val_acc"] == best["val_acc"]
    assert (tmp_path / "retrain" / "retrain.pt").is_file() and (tmp_path / "cand_002" / "candidate.pt").is_file()
    with pytest.raises(Exception, match="budget"):
        bl.run_method(_cfg(kind="random", samples=8), tmp_path / "tiny")  # 82 images < 8 batches


def _member(policy, acc):
    return {"policy": dict(enumerate(policy)), "val_acc": acc}


def test_candidate_ties_on_val_acc_go_to_the_lower_val_loss():
    recs = [{"val_acc": 0.83, "val_loss": 0.60}, {"val_acc": 0.80, "val_loss": 0.10},
            {"val_acc": 0.83, "val_loss": 0.58}, {"val_acc": 0.83, "val_loss": 0.59}]
    assert best_record(recs) is recs[2]
    plain = [{"val_acc": 0.5}, {"val_acc": 0.5}]
    assert best_record(plain) is plain[0]  # members without a loss: the earliest
    nan = [{"val_acc": 0.5, "val_loss": 0.7}, {"val_acc": 0.5, "val_loss": float("nan")}]
    assert best_record(nan) is nan[0]
    odd = [{"val_acc": 0.5, "val_loss": None}, {"val_acc": 0.5, "val_loss": True}, {"val_acc": 0.5, "val_loss": 2.0}]
    assert best_record(odd) is odd[2]  # None and bool are not losses


def test_evolution_step_is_aging_tournament():
    ops = ["prepend", "add", "affine", "cross_attn"]
    pop = [_member(p, a) for p, a in ((["add"] * 3, 0.2), (["affine"] * 3, 0.9), (["prepend"] * 3, 0.5),
                                       (["cross_attn"] * 3, 0.7))]
    fitness = lambda pol: 0.1 * sum(o == "add" for o in pol.values())  # noqa: E731
    for seed in range(60):
        new, child = bl.regularized_evolution_step(pop, fitness, 2, ops, random.Random(seed))
        again, child2 = bl.regularized_evolution_step(pop, fitness, 2, ops, random.Random(seed))
        assert child == child2 and new == again  # deterministic for a seed
        drawn = random.Random(seed).choices(range(4), k=2)
        assert child["parent"] == max(drawn, key=lambda i: pop[i]["val_acc"])  # best of the tournament
        parent = pop[child["parent"]]["policy"]
        diff = [l for l in parent if parent[l] != child["policy"][l]]
        assert len(diff) == 1 and child["policy"][diff[0]] in ops  # exactly one layer mutated
        assert len(new) == len(pop) and new[:-1] == pop[1:] and new[-1] is child  # oldest removed
        assert child["val_acc"] == fitness(child["policy"])
    _, child = bl.regularized_evolution_step(pop, fitness, 200, ops, random.Random(0))
    assert child["parent"] == 1  # a large tournament finds the global best


def test_evolution_respects_budget_and_ages(tmp_path):
    cfg = _cfg(kind="evolution", population=2, sample_size=2, budget_multiplier=2.0)
    r = bl.run_method(cfg, tmp_path / "budget")
    assert r["cost_images"] <= r["budget_images"] == 2 * 82
    hist = r["history"]
    # planned max(samples=8, population + 1) candidates -> 1 step each -> 164 // 16 = 10 candidates
    assert len(hist) == 10 and all(h["images"] == BATCH for h in hist)
    assert [h["cycle"] for h in hist] == [None, None] + list(range(8))
    assert all(h["parent"] is not None and h["parent"] < h["id"] for h in hist[2:])
    assert r["final_population"] == [8, 9]  # the two youngest survive, whatever their accuracy
    assert r["select_val_acc"] == max(h["val_acc"] for h in hist)
    capped = bl.run_method(cfg, tmp_path / "capped", cycles=1)
    assert len(capped["history"]) == 3 and capped["cost_images"] <= capped["budget_images"]
    summary = bl.regularized_evolution(cfg, population=2, sample=2, cycles=1, out_dir=tmp_path / "capped")
    assert summary["test_acc"] == capped["test_acc"]  # finished run: the CLI entry point only reloads


@pytest.mark.parametrize("kind, method", [("evolution", {"population": 2, "sample_size": 2}), ("random", {"samples": 3})])
def test_a_retrain_lr_grid_shares_one_random_or_evolution_selection(tmp_path, kind, method):
    """Runs that differ only in the retrain (a study's lr grid, ``search_cache``) train the candidates once; each
    retrains on its own and gets what an unshared run gets; each reports the loop's events once, a resumed run
    the rest."""
    a = tiny_config(method={"kind": kind, "budget_multiplier": 2.0, **method})
    b, c = (merge_dotted(a, {"train.optim.lr": a.train.optim.lr * f}) for f in (4, 2))
    cache, seen_a, seen_b, seen_c = tmp_path / "cache", [], [], []
    ra = bl.run_method(a, tmp_path / "a", seen_a.append, search_cache=cache)
    (slot,) = cache.iterdir()
    stamp = (slot / "state.json").stat().st_mtime_ns
    rb = bl.run_method(b, tmp_path / "b", seen_b.append, search_cache=cache)
    assert (slot / "state.json").stat().st_mtime_ns == stamp and len(list(cache.iterdir())) == 1  # no new loop
    assert rb["history"] == ra["history"] and rb["policy"] == ra["policy"] and len(ra["history"]) >= 3

    def loop(seen):
        return [m for m in seen if m.get("phase") == kind]

    assert loop(seen_b) == loop(seen_a) and len(loop(seen_a)) == len(ra["history"])
    assert (tmp_path / "b" / "state.json").is_file() and (tmp_path / "b" / "cand_000" / "candidate.pt").is_file()
    assert rb["retrain_history"][-1]["train_loss"] != ra["retrain_history"][-1]["train_loss"]  # its own retrain
    alone = bl.run_method(a, tmp_path / "alone")  # unshared: the same candidates, the same retrain
    drop = ("time_s", "epoch_time_s", "images_per_s")

    def strip(hist):
        return [{k: v for k, v in h.items() if k not in drop} for h in hist]

    assert strip(alone["history"]) == strip(ra["history"])
    assert strip(alone["retrain_history"]) == strip(ra["retrain_history"]) and alone["test_acc"] == ra["test_acc"]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "selection_reported").write_text("1")  # killed after reporting the loop's first event
    bl.run_method(c, tmp_path / "c", seen_c.append, search_cache=cache)
    assert loop(seen_c) == loop(seen_a)[1:]
    again = []
    assert bl.run_method(b, tmp_path / "b", again.append, search_cache=cache)["test_acc"] == rb["test_acc"]
    assert loop(again) == []  # its own folder holds the loop now: nothing reported twice


def test_weight_sharing_ranks_through_shared_weights(exp, tmp_path):
    cfg = _cfg(kind="random", samples=4, weight_sharing=True)
    r = bl.run_method(cfg, tmp_path)
    assert r["cost_images"] == (82 // BATCH) * BATCH <= r["budget_images"] == 82
    assert len(r["history"]) == 4 and r["shared_steps"] == 5
    # rebuild the trained supernet and check a ranked policy scores the same through a pinned path
    e = Experiment(cfg, exp.backbone, exp.data, exp.device)
    net = e.supernet()
    st = torch.load(tmp_path / "shared" / "shared.pt", weights_only=True)
    net.load_trainable_state_dict(st["model"])
    net.mode = "gumbel"
    rec = r["history"][2]
    idx = [net.candidates.index(rec["policy"][str(l)]) for l in range(2)]
    bl.set_path(net, idx)
    acc = evaluate(net, e.data, "val", 256, e.device)["acc"]
    assert acc == rec["val_acc"]
    # a pinned path is exactly the fixed model built from the shared weights, in train and eval mode
    fixed = e.fixed([rec["policy"]["0"], rec["policy"]["1"]])
    for l, i in enumerate(idx):
        fixed.layers[l].prompts.data.copy_(net.layers[l].prompts.data)
        fixed.layers[l].ops[0].load_state_dict(net.layers[l].ops[i].state_dict())
    fixed.head.load_state_dict(net.head.state_dict())
    x = next(iter(e.data.batches("val", 8)))[0]
    for train in (False, True):
        net.train(train), fixed.train(train)
        torch.testing.assert_close(net(x), fixed(x))


def test_random_search_resume_skips_finished_candidates(tmp_path, monkeypatch):
    cfg = _cfg(kind="random", samples=4, budget_multiplier=2.0)
    ref = bl.run_method(cfg, tmp_path / "ref")

    class Stop(Exception):
        pass

    def stop_after_two(m):
        if m["phase"] == "random" and m["candidate"] == 1:
            raise Stop

    with pytest.raises(Stop):
        bl.run_method(cfg, tmp_path / "run", on_epoch=stop_after_two)
    assert len(json.loads((tmp_path / "run" / "state.json").read_text())["done"]) == 2
    trained = []
    real = discrete.train_candidate

    def counting(exp, policy, folder, steps):
        trained.append(folder.name)
        return real(exp, policy, folder, steps)

    monkeypatch.setattr(discrete, "train_candidate", counting)
    seen = []
    res = bl.run_method(cfg, tmp_path / "run", on_epoch=seen.append)
    assert trained == ["cand_002", "cand_003"]
    assert [m["candidate"] for m in seen if m["phase"] == "random"] == [2, 3]
    assert [m["phase"] for m in seen if m["phase"] != "random"] == ["retrain"] * 2
    # progress for a study's ETA: the images spent and the budget, as epochs of train (39 images: 2 batches of 16)
    sel = [m for m in seen if m["phase"] == "random"]
    assert [m["select_epochs_done"] for m in sel] == [m["cost_images"] / 32 for m in sel]
    assert sel[-1]["select_epochs_planned"] == ref["budget_images"] / 32 >= sel[-1]["select_epochs_done"] > 0
    assert not any("select_epochs_done" in m for m in seen if m["phase"] == "retrain")
    for key in ("policy", "val_acc", "test_acc", "cost_images", "tuned_params"):
        assert res[key] == ref[key], key
    assert [h["val_acc"] for h in res["history"]] == [h["val_acc"] for h in ref["history"]]
    with pytest.raises(Exception, match="different configuration"):
        bl.run_method(_cfg(kind="random", samples=3, budget_multiplier=2.0), tmp_path / "run")


def test_budget_in_images_or_seconds_and_cost_in_both(exp, tmp_path):
    """method.budget_images / budget_seconds replace the search's image count; every method reports its
    cost in images and in measured training-step seconds."""
    e = lambda cfg: Experiment(cfg, exp.backbone, exp.data, exp.device)
    search = _cfg(kind="search")
    s = bl.run_method(search, tmp_path / "search", exp=e(search))
    assert s["cost_images"] == bl.search_cost(search, exp.data)["total"]
    assert s["cost_step_s"] == pytest.approx(sum(h["epoch_time_s"] for h in s["history"])) and s["cost_step_s"] > 0
    fixed = _cfg(kind="random", samples=2, budget_images=4 * BATCH)
    r = bl.run_method(fixed, tmp_path / "images", exp=e(fixed))
    assert r["budget_images"] == 64 and r["cost_images"] == 64 and r["cost_step_s"] > 0
    timed = _cfg(kind="evolution", population=2, sample_size=1, budget_seconds=0.5)
    r = bl.run_method(timed, tmp_path / "seconds", exp=e(timed))
    st = json.loads((tmp_path / "seconds" / "state.json").read_text())
    assert r["budget_images"] == st["budget_images"] == int(0.5 / st["step_s_per_image"])  # converted once
    assert r["cost_images"] <= r["budget_images"]
    with pytest.raises(Exception, match="not both"):
        _cfg(kind="random", budget_images=10, budget_seconds=1.0)
