"""Throughput benchmark on a tiny ViT: every row present and finite, ratios, param ordering, JSON, CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_config
from pfnas.bench import bench_end_to_end, run_bench, time_steps
from pfnas.cli import main
from pfnas.config import ConfigError

ROWS = {"frozen_forward", "vpt_deep", "search_softmax", "search_gumbel", "retrain_mixed", "retrain_add",
        "retrain_affine", "retrain_cross_attn", "linear_probe"}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads; one keeps the module fast on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_run_bench_rows_ratios_params_and_json(tmp_path):
    out = tmp_path / "bench" / "bench.json"
    res = run_bench(tiny_config(), batch_size=4, steps=2, warmup=1, out=out)
    rows = {r["key"]: r for r in res["rows"]}
    assert set(rows) == ROWS
    for r in rows.values():
        assert math.isfinite(r["images_per_s"]) and r["images_per_s"] > 0
        assert r["ms"] > 0 and math.isfinite(r["ratio_vpt"])
    assert rows["vpt_deep"]["ratio_vpt"] == 1.0
    assert rows["linear_probe"]["tuned_params"] < rows["vpt_deep"]["tuned_params"] < rows["search_softmax"]["tuned_params"]
    assert rows["frozen_forward"]["tuned_params"] == 0
    for key in ("search_softmax", "search_gumbel"):  # img/s counts train images; parts add up to the step
        r = rows[key]
        assert r["arch_ms"] > 0 and r["weight_ms"] > 0 and r["amortised_images_per_s"] > r["images_per_s"]
    assert rows["retrain_mixed"]["policy"] == ["prepend", "add"]  # layers cycle through prompts.ops
    assert rows["search_gumbel"]["check"] in ("pass", "below")
    assert [t["check"] in ("pass", "below") for t in res["targets"]] == [True] * 3
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
    assert main(["bench", "--steps", "0"]) == 2
