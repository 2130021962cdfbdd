"""Bilevel search, retraining, checkpoint/resume and user-facing errors of the engine."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import DIVERGING_BACKBONE, blank_image_folder, pfnas_process, tiny_config
from pfnas.config import (ConfigError, OptimConfig, TemperatureConfig, TrainingError, load_config, merge_dotted,
                          search_hash)
from pfnas.engine import (Experiment, SearchPhase, lr_at, run_experiment, run_retrain, run_search, shared_search,
                          temperature)


def _trainable(model):
    return {k: v.clone() for k, v in model.trainable_state_dict().items()}


def test_temperature_schedules():
    for sched in ("constant", "linear", "cosine", "exponential"):
        t = TemperatureConfig(start=5.0, end=0.5, schedule=sched)
        assert temperature(t, 0.0) == pytest.approx(5.0)
        assert temperature(t, 1.0) == pytest.approx(5.0 if sched == "constant" else 0.5)
    assert temperature(TemperatureConfig(start=4, end=1, schedule="linear"), 0.5) == pytest.approx(2.5)
    assert temperature(TemperatureConfig(start=4, end=1, schedule="exponential"), 0.5) == pytest.approx(2.0)
    assert temperature(TemperatureConfig(start=4, end=1, schedule="cosine"), 0.5) == pytest.approx(2.5)


def test_lr_schedule_scales_warms_up_and_decays():
    o = OptimConfig(lr=1.0, warmup_epochs=1)
    assert lr_at(o, 128, 0, 10, 5) == pytest.approx(0.5 / 10)  # scaled by 128/256, warmup step 1/10
    assert lr_at(o, 128, 10, 10, 5) == pytest.approx(0.5)  # peak after warmup
    assert lr_at(o, 128, 49, 10, 5) < 0.01


def test_search_writes_policy_log_and_tracks_entropy(exp, tmp_path):
    phase = run_search(exp, tmp_path)
    lines = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2] and all(l["phase"] == "search" for l in lines)
    assert len(lines[-1]["alpha_entropy_per_layer"]) == 2
    assert all(0.0 <= h <= 1.0 for h in lines[-1]["alpha_entropy_per_layer"])
    policy = json.loads((tmp_path / "policy.json").read_text())
    assert policy == {str(k): v for k, v in phase.model.discretize().items()}
    assert not torch.allclose(phase.model.alpha.detach(), torch.zeros_like(phase.model.alpha), atol=1e-3)


def test_gated_search_moves_gates_and_selects_by_perturbation(tmp_path):
    """search.mode=sigmoid runs the bilevel loop end to end: alpha moves, perturbation selection on val gives
    a valid policy, and the label the trackers use names the mode."""
    from pfnas.tracking import method_label

    cfg = tiny_config(search={"mode": "sigmoid", "select": "perturb", "arch_lr": 0.1})
    phase = run_search(Experiment.build(cfg), tmp_path)
    assert not torch.allclose(phase.model.alpha.detach(), torch.zeros_like(phase.model.alpha), atol=1e-3)
    assert set(phase.policy.values()) <= set(cfg.prompts.ops) and len(phase.policy) == 2
    assert json.loads((tmp_path / "policy.json").read_text()) == {str(k): v for k, v in phase.policy.items()}
    assert method_label(cfg) == "search-sigmoid"


def _one_arch_step(exp, order: int) -> torch.Tensor:
    cfg = tiny_config(search={"order": order, "epochs": 2, "optim": {"lr": 1.0, "warmup_epochs": 0}})
    model = exp.supernet()
    phase = SearchPhase(cfg, model, exp.data, exp.device)
    xt, yt = next(exp.data.batches("train", 16))
    xv, yv = next(exp.data.batches("val", 16))
    before = _trainable(model)
    torch.manual_seed(0)
    phase._arch_step(xt, yt, xv, yv)
    after = _trainable(model)
    for k in before:  # the weights are restored after the unrolled look-ahead
        if k != "alpha":
            torch.testing.assert_close(after[k], before[k])
    assert not torch.equal(after["alpha"], before["alpha"])
    return model.alpha.grad.clone()


def test_second_order_step_differs_from_first_order(exp):
    """Adam's first step is ~lr*sign(g) either way, so compare the architecture gradients."""
    g1, g2 = _one_arch_step(exp, 1), _one_arch_step(exp, 2)
    assert g1.abs().sum() > 0 and g2.abs().sum() > 0
    assert not torch.allclose(g1, g2, rtol=1e-4, atol=1e-7)


def test_resume_equals_uninterrupted_run(tmp_path):
    cfg = tiny_config(search={"epochs": 3, "mode": "gumbel", "tau": {"start": 2.0, "end": 0.5, "schedule": "linear"},
                              "optim": {"lr": 1.0, "warmup_epochs": 1}},
                      prompts={"length": 4, "dropout": 0.1, "fusion_dim": 4})
    full = run_search(Experiment.build(cfg), tmp_path / "full")
    run_search(Experiment.build(cfg), tmp_path / "cut", stop_after=1)
    assert json.loads((tmp_path / "cut" / "log.jsonl").read_text().splitlines()[-1])["epoch"] == 1
    torch.manual_seed(1234)  # a fresh process would have a different global RNG; the checkpoint restores it
    resumed = run_search(Experiment.build(cfg), tmp_path / "cut")
    a, b = _trainable(full.model), _trainable(resumed.model)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    strip = lambda h: [{k: v for k, v in e.items() if k not in ("epoch_time_s", "images_per_s")} for e in h]
    assert strip(full.history) == strip(resumed.history)


def test_fair_warmup_trains_one_op_per_layer_each_op_once_per_block(tmp_path, monkeypatch):
    cfg = tiny_config(search={"epochs": 3, "arch_warmup_epochs": 2, "warmup_paths": "fair"})
    e = Experiment.build(cfg)
    seen, weight_step = [], SearchPhase._weight_step

    def record(self, x, y):
        seen.append((self.epoch, self.step, self.model.path))
        return weight_step(self, x, y)

    monkeypatch.setattr(SearchPhase, "_weight_step", record)
    phase = run_search(e, tmp_path / "fair")
    n_ops, depth = len(phase.model.candidates), phase.model.depth
    assert (n_ops, depth) == (4, 2)
    warm = [(st, p) for ep, st, p in seen if ep < 2]
    assert len(warm) == 4 and all(p is not None and len(p) == depth for _, p in warm)
    assert all(p is None for ep, _, p in seen if ep >= 2) and phase.model.path is None  # the alpha epoch mixes
    assert all(p == phase.fair_path(st) for st, p in warm)  # drawn from (seed, step): a resume draws the same
    for start in (0, 4, 8):  # every block of n_ops steps runs each op once in every layer
        block = [phase.fair_path(st) for st in range(start, start + n_ops)]
        assert all(sorted(b[l] for b in block) == list(range(n_ops)) for l in range(depth))
    assert len({tuple(phase.fair_path(st)) for st in range(8)}) > 1
    # a path runs its ops alone: the other ops get no gradient, alpha none
    model = phase.model
    x = torch.randn(2, 3, 16, 16)
    model.path = [model.candidates.index("add")] * depth
    try:
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
        grads = {n for n, p in model.named_parameters() if p.grad is not None}
        assert not any(".ops." in n for n in grads) and "alpha" not in grads and "layers.0.prompts" in grads
    finally:
        model.path = None
    with pytest.raises(ValueError, match="arch_warmup_epochs"):
        tiny_config(search={"warmup_paths": "fair"})
    with pytest.raises(ValueError, match=r"arch_warmup_epochs \(3\) must be below search.epochs \(3\)"):
        tiny_config(search={"epochs": 3, "arch_warmup_epochs": 3})  # alpha would never move: refused


def test_runs_that_differ_after_the_search_share_one_search(tmp_path):
    """A retrain-lr grid searches once: the second run replays the first one's search and retrains exactly as an
    unshared run would; a run with another search config searches on its own."""
    cache = tmp_path / "cache"
    a = tiny_config(train={"stage": "select"})
    b = merge_dotted(a, {"train.optim.lr": 0.3, "train.stage": "final"})  # what a final / another grid point changes
    seen_a, seen_b = [], []
    ra = run_experiment(a, tmp_path / "a", seen_a.append, search_cache=cache)
    rb = run_experiment(b, tmp_path / "b", seen_b.append, search_cache=cache)
    assert len(list(cache.iterdir())) == 1
    search_of = lambda seen: [(m["epoch"], m["val_loss"]) for m in seen if m["phase"] == "search"]
    assert search_of(seen_b) == search_of(seen_a) and len(search_of(seen_a)) == 2  # replayed, not rerun
    assert [m for m in seen_b if m["phase"] == "search"][-1]["alpha"] == seen_a[1]["alpha"]  # the heatmap too
    alone = run_experiment(b, tmp_path / "alone")  # no cache: b's own search
    assert rb.policy == ra.policy == alone.policy
    assert torch.equal(torch.load(tmp_path / "b" / "alpha.pt"), torch.load(tmp_path / "alone" / "alpha.pt"))
    assert rb.test_acc == alone.test_acc and rb.retrain_history[-1]["train_loss"] == alone.retrain_history[-1]["train_loss"]
    assert rb.retrain_history[-1]["train_loss"] != ra.retrain_history[-1]["train_loss"]  # the lr did change the retrain
    phases = [json.loads(l)["phase"] for l in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert phases == ["search", "search", "retrain", "retrain"]  # the run folder is complete
    again = run_experiment(b, tmp_path / "b", seen_b.append, search_cache=cache)  # resumes: nothing reported twice
    assert again.test_acc == rb.test_acc and len(search_of(seen_b)) == 2
    c = merge_dotted(a, {"search.arch_lr": 0.01})
    seen_c = []
    run_experiment(c, tmp_path / "c", seen_c.append, search_cache=cache)
    assert len(list(cache.iterdir())) == 2 and search_of(seen_c) != search_of(seen_a)


def test_a_resumed_run_reports_the_epochs_its_shared_search_ran_while_it_was_down(tmp_path):
    """Killed after reporting search epoch 1 while the shared slot went on to epoch 2 (Tune restores the run folder
    of its last report): the resumed run reports epochs 2, 3 and 4 once each, the last with its alpha heatmap."""
    cfg = tiny_config(search={"epochs": 4})
    cache, out = tmp_path / "cache", tmp_path / "run"
    slot = cache / search_hash(cfg)
    exp = Experiment.build(cfg)
    run_search(exp, slot, stop_after=2)  # the shared search got this far before the kill
    out.mkdir()
    (out / "search_reported").write_text("1")
    seen = []
    phase = shared_search(exp, out, cache, seen.append)
    searched = [m for m in seen if m["phase"] == "search"]
    assert [m["epoch"] for m in searched] == [2, 3, 4]
    assert phase.policy is not None and isinstance(searched[-1].get("alpha"), list)
    ref = []
    run_search(Experiment.build(cfg), tmp_path / "alone", ref.append)
    assert [m["val_loss"] for m in searched] == [m["val_loss"] for m in ref[1:]]


def test_retrain_and_experiment_end_to_end(tmp_path):
    cfg = tiny_config()
    res = run_experiment(cfg, tmp_path)
    assert set(res.policy.values()) <= {"prepend", "add", "affine", "cross_attn"} and len(res.policy) == 2
    assert 0.0 <= res.test_acc <= 1.0
    assert res.tuned_params > 0 and 0 < res.tuned_percent < 100
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["test_acc"] == res.test_acc
    phases = [json.loads(l)["phase"] for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert phases == ["search", "search", "retrain", "retrain"]
    # rerunning resumes from finished checkpoints: no new epochs, same answer
    again = run_experiment(cfg, tmp_path)
    assert again.test_acc == res.test_acc
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 4


@pytest.mark.slow
def test_vpt_deep_learns_a_real_task_on_the_proxy_backbone(shared_proxy, tmp_path):
    """Real pretrained features + real data: one epoch of all-prepend on train800 is far above chance (10%) on val200
    (the select stage: a fifth fewer training images than train800val200 and no 797-image test pass)."""
    ckpt, root = shared_proxy
    cfg = tiny_config(backbone={"name": "vit_tiny_patch16_224", "checkpoint": str(ckpt),
                                "kwargs": {"img_size": 32, "patch_size": 4},
                                "mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]},
                      data={"kind": "vtab", "root": str(root), "task": "digits", "batch_size": 64},
                      prompts={"length": 5, "dropout": 0.0, "fusion_dim": 4},
                      train={"epochs": 1, "stage": "select", "optim": {"lr": 0.5, "warmup_epochs": 0}})
    exp = Experiment.build(cfg)
    phase = run_retrain(exp, ["prepend"] * 12, tmp_path)
    assert phase.history[-1]["val_acc"] > 0.4 and "test_acc" not in phase.history[-1]


def test_training_loss_decreases(tmp_path):
    cfg = tiny_config(train={"epochs": 6, "optim": {"lr": 1.0, "warmup_epochs": 0}})
    phase = run_retrain(Experiment.build(cfg), ["prepend", "affine"], tmp_path, eval_every=6)
    losses = [h["train_loss"] for h in phase.history]
    assert losses[-1] < losses[0]


def test_nan_loss_raises_training_error(tmp_path):
    cfg = tiny_config(backbone=DIVERGING_BACKBONE, train={"epochs": 2, "optim": {"grad_clip": None}})
    exp = Experiment.build(cfg)
    with pytest.raises(TrainingError, match="non-finite loss"):
        run_retrain(exp, ["add", "add"], tmp_path)


def test_a_final_that_collapses_to_one_class_fails_before_test_is_scored(tmp_path):
    """Identical images: the model can only predict one class, a third of the labels. The final's last epoch
    sees it and raises (deterministic, so a study fails the trial instead of retrying), and no test score exists;
    the select stage of the same run still scores val (a real, if poor, score that selection ranks)."""
    data = {"kind": "imagefolder", "root": str(blank_image_folder(tmp_path / "blank"))}
    final = tiny_config(data=data, train={"stage": "final", "collapse_check": True})
    with pytest.raises(TrainingError, match=r"collapsed: after epoch 2 the model predicts class \d for 100% of its "
                                            r"training images \(3\d% of their labels\)") as ei:
        run_retrain(Experiment.build(final), ["add", "add"], tmp_path / "final")
    assert ei.value.deterministic and "\n" not in str(ei.value)
    log = [json.loads(line) for line in (tmp_path / "final" / "log.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in log] == [1] and not any("test_acc" in m for m in log)
    phase = run_retrain(Experiment.build(tiny_config(data=data, train={"stage": "select"})), ["add", "add"],
                        tmp_path / "select")
    assert phase.epoch == 2 and 0.0 <= phase.history[-1]["val_acc"] <= 1.0


def test_collapse_is_one_minority_class_nearly_always():
    from pfnas.engine.phases import collapse_error

    def counts(pred, true):
        return torch.tensor([pred, true])

    assert collapse_error(counts([96, 2, 2], [34, 33, 33]), 30) is not None
    assert collapse_error(counts([94, 3, 3], [34, 33, 33]), 30) is None  # under the share
    assert collapse_error(counts([100, 0, 0], [60, 20, 20]), 30) is None  # the majority label: a fit, not a collapse
    assert collapse_error(counts([0, 0, 0], [0, 0, 0]), 30) is None


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"^search\.bogus: unknown field"):
        load_config(None, ["search.bogus=1"])
    with pytest.raises(ConfigError, match=r"^search\.arch_lr: "):
        load_config(None, ["search.arch_lr=-1"])
    with pytest.raises(ConfigError, match=r"prompts\.ops"):
        load_config(None, ["prompts.ops=[prepend,shuffle]"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  kind: vtab\n")
    with pytest.raises(ConfigError, match="data.root is required"):
        load_config(bad)
    assert load_config(None, ["search.arch_lr=1e-3", "prompts.length=5"]).search.arch_lr == 1e-3


@pytest.mark.slow
def test_cli_process_exit_code_and_run(tmp_path):
    """The bad-setting half (exit 2): tests/test_cli_exit_codes.py."""
    db = tmp_path / "m.db"
    ok = pfnas_process("run", "--out", str(tmp_path / "o"), "--tracking-uri", f"sqlite:///{db}", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    res = json.loads((tmp_path / "o" / "result.json").read_text())
    assert len(res["policy"]) == 4 and res["test_acc"] > 0.5  # the embedded demo (no -c) learns (chance is 0.25)
    from pfnas.tracking import make_client

    client = make_client(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["pfnas.kind"] == "run" and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["test_acc"] == pytest.approx(res["test_acc"])
    assert (tmp_path / "o" / "mlflow_run_id").read_text() == runs[0].info.run_id
