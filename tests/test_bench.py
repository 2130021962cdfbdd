"""Throughput benchmark on a tiny ViT: every row present and finite, ratios, FLOPs, param ordering, JSON, CLI,
the plain timm VPT-deep reference (numerically VPT-deep) and ``--compile``."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from conftest import tiny_config
from pfnas.bench import PlainVPTDeep, bench_end_to_end, run_bench
from pfnas.timing import time_steps
from pfnas.cli import main
from pfnas.config import ConfigError, merge_dotted
from pfnas.model import PromptedViT, load_backbone

ROWS = {"frozen_forward", "plain_vpt_deep", "vpt_deep", "search_softmax", "search_gumbel", "retrain_mixed", "retrain_add",
        "retrain_affine", "retrain_cross_attn", "linear_probe", "oneshot_fair"}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads; one keeps the module fast on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
def test_run_bench_rows_ratios_params_and_json(tmp_path):
    out = tmp_path / "bench" / "bench.json"
    res = run_bench(tiny_config(), batch_size=4, steps=2, warmup=1, out=out)
    rows = {r["key"]: r for r in res["rows"]}
    assert set(rows) == ROWS
    for r in rows.values():
        assert math.isfinite(r["images_per_s"]) and r["images_per_s"] > 0
        assert r["ms"] > 0 and math.isfinite(r["ratio_vpt"])
    assert rows["vpt_deep"]["ratio_vpt"] == 1.0 and rows["plain_vpt_deep"]["ratio_plain"] == 1.0
    assert rows["vpt_deep"]["ratio_plain"] == pytest.approx(1.0 / rows["plain_vpt_deep"]["ratio_vpt"])
    assert rows["plain_vpt_deep"]["tuned_params"] == rows["vpt_deep"]["tuned_params"]  # same prompts + head
    for r in rows.values():  # FLOPs counted once per step; achieved TFLOP/s at the median step time
        assert r["gflop_per_step"] > 0 and math.isfinite(r["tflops"]) and r["tflops"] > 0
        assert r["tflops"] == pytest.approx(r["gflop_per_step"] / r["ms"]) and "error" not in r
    assert rows["vpt_deep"]["gflop_per_step"] > rows["frozen_forward"]["gflop_per_step"] > 0
    assert rows["plain_vpt_deep"]["gflop_per_step"] == pytest.approx(rows["vpt_deep"]["gflop_per_step"], rel=0.02)
    assert rows["vpt_deep"]["check"] in ("pass", "below") and rows["vpt_deep"]["target"] == 0.95
    assert rows["linear_probe"]["tuned_params"] < rows["vpt_deep"]["tuned_params"] < rows["search_softmax"]["tuned_params"]
    assert rows["frozen_forward"]["tuned_params"] == 0
    for key in ("search_softmax", "search_gumbel"):  # img/s counts train images; parts add up to the step
        r = rows[key]
        assert r["arch_ms"] > 0 and r["weight_ms"] > 0 and r["amortised_images_per_s"] > r["images_per_s"]
    assert rows["retrain_mixed"]["policy"] == ["prepend", "add"]  # layers cycle through prompts.ops
    fair = rows["oneshot_fair"]  # a fair step runs the batch once per op: 4 ops x 4 images = 16 training images
    assert fair["images_per_step"] == 16 and fair["images_per_s"] == pytest.approx(16 / (fair["ms"] / 1e3))
    assert rows["search_gumbel"]["check"] in ("pass", "below")
    assert [t["check"] in ("pass", "below") for t in res["targets"]] == [True] * 4
    assert res["targets"][-1]["vs"] == "plain VPT-deep" and res["targets"][-1]["target"] == 0.95
    assert res["torch"] == torch.__version__ and res["timm"] and res["device"]
    saved = json.loads(out.read_text())
    assert {r["key"] for r in saved["rows"]} == ROWS and saved["batch_size"] == 4


def test_run_bench_takes_a_policy():
    res = run_bench(tiny_config(), batch_size=2, steps=1, warmup=0, policy=["cross_attn", "none"])
    mixed = next(r for r in res["rows"] if r["key"] == "retrain_mixed")
    assert mixed["policy"] == ["cross_attn", "none"] and res["mixed_policy"] == ["cross_attn", "none"]


def test_bad_step_counts_are_user_errors():
    with pytest.raises(ConfigError):
        time_steps(lambda lap: None, torch.device("cpu"), 0, 0)
    with pytest.raises(ConfigError):
        run_bench(tiny_config(), batch_size=0)


def test_time_steps_splits_parts_at_laps():
    res = time_steps(lambda lap: (lap(), lap()), torch.device("cpu"), 3, 1)
    assert len(res["parts_ms"]) == 3 and res["ms"] >= 0


def test_end_to_end_compares_wall_time_with_step_time(tmp_path):
    cfg = tiny_config(search={"epochs": 1}, train={"epochs": 1})
    e = bench_end_to_end(cfg, tmp_path, steps=1, warmup=0)
    assert e["wall_s"] > 0 and e["predicted_s"] > 0 and e["ratio"] == pytest.approx(e["wall_s"] / e["predicted_s"])
    assert e["counts"]["search_weight_steps"] >= 1 and e["counts"]["retrain_steps"] >= 1
    assert e["counts"]["arch_steps"] >= 1 and e["check"] in ("pass", "below")


def test_cli_bench(tmp_path):
    out = tmp_path / "b.json"
    code = main(["bench", "--steps", "2", "--warmup", "1", "--batch-size", "4", "--out", str(out),
                 "--set", "backbone.kwargs={img_size: 16, patch_size: 4, depth: 2, embed_dim: 32, num_heads: 2}",
                 "--set", "prompts.length=4"])
    assert code == 0
    assert {r["key"] for r in json.loads(out.read_text())["rows"]} == ROWS


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_plain_reference_is_vpt_deep(pool):
    """The plain timm step's logits equal pfnas's all-prepend PromptedViT's (same prompts and head copied in)."""
    cfg = merge_dotted(tiny_config(prompts={"dropout": 0.3}), {"backbone.kwargs.global_pool": pool})
    torch.manual_seed(0)
    backbone = load_backbone(cfg.backbone)
    depth = len(backbone.blocks)
    ref = PromptedViT(backbone, 5, cfg.prompts, policy=["prepend"] * depth)
    plain = PlainVPTDeep(backbone, 5, cfg.prompts.length, cfg.prompts.dropout)
    bound = plain.prompts.abs().max().item()  # VPT's uniform init bound, as pfnas draws it
    assert bound <= math.sqrt(6.0 / (3 * 4 * 4 + 32)) and bound > 0.5 * math.sqrt(6.0 / (3 * 4 * 4 + 32))
    with torch.no_grad():
        plain.prompts.copy_(torch.stack([layer.prompts for layer in ref.layers]))
        plain.head.load_state_dict(ref.head.state_dict())
    x = torch.randn(6, 3, 16, 16)
    ref.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), ref(x), rtol=1e-5, atol=1e-5)
    ref.train(), plain.train()  # per-sample prompt dropout draws the same masks from the same seed
    assert not plain.backbone.training
    with torch.no_grad():
        torch.manual_seed(1)
        a = plain(x)
        torch.manual_seed(1)
        torch.testing.assert_close(a, ref(x), rtol=1e-5, atol=1e-5)
        torch.manual_seed(2)
        assert not torch.allclose(a, plain(x))  # dropout is on in train mode


def _compile_unavailable() -> str | None:
    """Why torch.compile (inductor) cannot run here, or None."""
    if shutil.which("cc") is None and shutil.which("gcc") is None and shutil.which("clang") is None:
        return "no C compiler for inductor"
    try:
        fn = torch.compile(lambda t: (t * 2).sin())
        fn(torch.randn(4))
    except Exception as e:  # noqa: BLE001 - any inductor/dynamo failure means: skip
        return f"torch.compile unavailable: {type(e).__name__}: {e}"[:200]
    return None


@pytest.mark.slow
def test_compile_failure_is_a_row_error(monkeypatch):
    """A row whose compilation fails reports ``error``; the other rows are still timed."""
    def compile_or_fail(self, *args, **kwargs):
        if type(self).__name__ == "PlainVPTDeep":
            raise RuntimeError("no backend")
        return orig(self, *args, backend="eager", **kwargs)

    orig = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", compile_or_fail)
    res = run_bench(tiny_config(), batch_size=2, steps=1, warmup=0, torch_compile=True)
    rows = {r["key"]: r for r in res["rows"]}
    assert set(rows) == ROWS and res["torch_compile"] is True
    assert "no backend" in rows["plain_vpt_deep"]["error"] and rows["plain_vpt_deep"]["images_per_s"] is None
    assert rows["vpt_deep"]["ratio_plain"] is None and res["targets"][-1]["check"] == "n/a"
    assert all(math.isfinite(r["images_per_s"]) for k, r in rows.items() if k != "plain_vpt_deep")


@pytest.mark.slow
def test_cli_bench_compile(tmp_path):
    reason = _compile_unavailable()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "b.json"
    code = main(["bench", "--compile", "--steps", "1", "--warmup", "0", "--batch-size", "2", "--out", str(out),
                 "--set", "backbone.kwargs={img_size: 16, patch_size: 4, depth: 1, embed_dim: 16, num_heads: 2}",
                 "--set", "prompts.length=2"])
    assert code == 0
    res = json.loads(out.read_text())
    assert res["torch_compile"] is True and {r["key"] for r in res["rows"]} == ROWS
    for r in res["rows"]:  # every row either compiled and was timed, or reports why not
        assert r.get("error") or (r["images_per_s"] > 0 and math.isfinite(r["tflops"]) and "recompiles" in r)
    assert not any(r.get("error") for r in res["rows"] if r["key"] in ("frozen_forward", "plain_vpt_deep", "vpt_deep"))
