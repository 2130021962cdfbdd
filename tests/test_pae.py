"""PAE plug-in: frequency init, Koopman / Lyapunov regulariser, engine integration and resume."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from pfnas.engine import Experiment, run_retrain, run_search
from pfnas.pae import (PAERegularizer, apply_pae, band_filter, band_masks, fit_score_head, frequency_init,
                       pooled_features, prompt_chain, vpt_init_bound)


@pytest.fixture(scope="module")
def exp():
    return Experiment.build(tiny_config(pae={"enabled": True}))


def _prompts(model):
    return [layer.prompts.detach().clone() for layer in model.layers]


def test_band_masks_slide_from_low_to_high():
    masks, centres = band_masks(16, 4, 0.25)
    assert masks.shape == (4, 16, 16) and centres == sorted(centres)
    assert masks[0, 8, 8] == 1 and masks[1:, 8, 8].sum() == 0  # only the lowest band keeps DC
    assert masks[-1, 0, 0] == 1 and masks[0, 0, 0] == 0  # the corner (highest frequency) is in the last band
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(band_filter(x, torch.ones(16, 16)), x, atol=1e-5, rtol=1e-5)
    low = band_filter(x, masks[0])
    assert low.std() < x.std()  # a band-pass removes energy


@pytest.mark.parametrize("policy", [None, ["add", "cross_attn"], ["affine", "prepend"], ["none", "prepend"]])
def test_frequency_init_deterministic_and_vpt_scaled(exp, policy):
    build = exp.supernet if policy is None else (lambda: exp.fixed(policy))
    cfg = exp.cfg.pae.model_copy(update={"score_batch": 16})  # < 39 train images: the seed picks the batch
    a, b, c = build(), build(), build()
    before = _prompts(a)
    frequency_init(a, exp.data, exp.device, cfg, seed=0)
    frequency_init(b, exp.data, exp.device, cfg, seed=0)
    frequency_init(c, exp.data, exp.device, cfg, seed=1)
    bound = vpt_init_bound(a)
    changed_vs_seed = False
    for pa, pb, pc, p0 in zip(_prompts(a), _prompts(b), _prompts(c), before):
        if p0.numel() == 0:  # op "none": nothing to initialise
            assert pa.numel() == 0
            continue
        assert torch.equal(pa, pb)
        assert not torch.allclose(pa, p0)
        changed_vs_seed |= not torch.allclose(pa, pc)
        rms = pa.pow(2).mean(-1).sqrt()  # every row has the RMS of a VPT uniform(-b, b) row
        torch.testing.assert_close(rms, torch.full_like(rms, bound / math.sqrt(3)), rtol=1e-4, atol=0)
        assert pa.abs().max() < 3 * bound
    assert changed_vs_seed  # another seed scores another batch


def test_chosen_mask_has_lowest_loss(exp):
    """Losses recomputed here with numpy's FFT (through the fitted score head) match the report, and layer 0
    gets the argmin mask."""
    model = exp.fixed(["prepend", "prepend"])
    head = fit_score_head(model.eval(), exp.data, exp.device, seed=3)
    cfg = exp.cfg.pae.model_copy(update={"n_bands": 6, "band_width": 0.3})
    gen = torch.Generator().manual_seed(3)
    x, y = next(iter(exp.data.batches("train", cfg.score_batch, shuffle=True, generator=gen)))
    size = x.shape[-1]
    yy, xx = np.meshgrid(np.arange(size) - size // 2, np.arange(size) - size // 2, indexing="ij")
    r = np.hypot(yy, xx) / np.hypot(size // 2, size // 2)
    losses = []
    _, centres = band_masks(x.shape[-1], cfg.n_bands, cfg.band_width)
    for c in centres:
        mask = (np.abs(r - c) <= cfg.band_width / 2 + 1e-6).astype(np.float64)
        spec = np.fft.fftshift(np.fft.fft2(x.double().numpy()), axes=(-2, -1)) * mask
        xf = np.fft.ifft2(np.fft.ifftshift(spec, axes=(-2, -1))).real
        model.eval()
        with torch.no_grad():
            losses.append(F.cross_entropy(head(pooled_features(model, torch.from_numpy(xf).float())), y).item())
    report = frequency_init(model, exp.data, exp.device, cfg, seed=3)  # scores the same model state
    np.testing.assert_allclose(report["losses"], losses, rtol=1e-4)
    assert len(set(np.round(losses, 6))) > 1
    best = int(np.argmin(losses))
    assert report["kept"][0] == best and report["layer_mask"][0] == best
    assert all(losses[k] <= losses[j] for k in report["kept"] for j in range(6) if j not in report["kept"])
    assert report["layer_mask"][1] == report["kept"][1]


def test_koopman_zero_on_exact_evolution():
    torch.manual_seed(0)
    reg = PAERegularizer(dim=32, latent_dim=8, seed=0)
    with torch.no_grad():
        reg.K.copy_(torch.linalg.qr(torch.randn(8, 8))[0] * 0.9)
    W = reg.encoder_weight().detach()
    chain = [torch.randn(5, 32)]
    for _ in range(3):  # minimal-norm P_{l+1} with P_{l+1} W^T = (P_l W^T) K
        chain.append(reg.encode(chain[-1]).detach() @ reg.K.detach() @ torch.linalg.pinv(W.t()))
    for a, b in zip(chain[:-1], chain[1:]):
        torch.testing.assert_close(reg.encode(a) @ reg.K, reg.encode(b), atol=1e-5, rtol=1e-5)
    assert reg.terms(chain)["koopman"].item() < 1e-9
    chain[2] = chain[2] + 0.1 * torch.randn_like(chain[2])
    assert reg.terms(chain)["koopman"].item() > 1e-3


def test_lyapunov_hinge():
    torch.manual_seed(1)
    reg = PAERegularizer(dim=32, latent_dim=8, seed=0)
    p = torch.randn(4, 32)
    shrinking, growing = [p, 0.5 * p, 0.25 * p], [p, 2 * p, 4 * p]
    assert reg.terms(shrinking)["lyapunov"].item() == 0.0
    z = [reg.encode(q) for q in growing]  # L = I at init: Q = I, V(z) = |z|^2
    expected = torch.stack([F.relu(b.pow(2).sum(-1) - a.pow(2).sum(-1)) for a, b in zip(z[:-1], z[1:])]).mean()
    torch.testing.assert_close(reg.terms(growing)["lyapunov"], expected)
    with torch.no_grad():  # any learned Q stays PSD and trace-normalised: scaling down never raises V
        reg.L.copy_(torch.randn(8, 8))
    torch.testing.assert_close(torch.trace(reg.lyapunov_matrix()), torch.tensor(8.0))
    assert reg.terms(shrinking)["lyapunov"].item() == 0.0 and reg.terms(growing)["lyapunov"].item() > 0
    mixed = [p, 2 * p, p]  # one increase, one decrease
    terms = reg.terms(mixed)
    v = reg.energy(reg.encode(p))
    torch.testing.assert_close(terms["lyapunov"], (3 * v).mean() / 2)
    torch.testing.assert_close(terms["total"], 0.1 * terms["koopman"] + 0.01 * terms["lyapunov"])


def test_gradients_reach_prompts_and_regulariser(exp):
    model = exp.supernet()
    reg = PAERegularizer(model.dim, 8, seed=0)
    with torch.no_grad():
        reg.L.add_(0.1 * torch.randn(8, 8))
    reg.loss(model).backward()
    for layer in model.layers:
        assert layer.prompts.grad is not None and layer.prompts.grad.abs().sum() > 0
    for name, p in reg.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_none_layers_are_skipped():
    cfg = tiny_config(backbone={"kwargs": {"img_size": 16, "patch_size": 4, "depth": 3, "embed_dim": 32,
                                           "num_heads": 2}}, pae={"enabled": True})
    exp3 = Experiment.build(cfg)
    model = exp3.fixed(["prepend", "none", "add"])
    chain = prompt_chain(model)
    assert len(chain) == 2 and chain[1] is model.layers[2].prompts
    reg = apply_pae(cfg.pae, model, exp3.data, exp3.device, seed=0)
    assert reg is not None and reg.init_report["layer_mask"].keys() == {0, 2}
    torch.testing.assert_close(reg.loss(model), reg.terms([model.layers[0].prompts, model.layers[2].prompts])["total"])
    lonely = exp3.fixed(["none", "none", "prepend"])
    before = _prompts(lonely)[2]
    assert apply_pae(cfg.pae, lonely, exp3.data, exp3.device, seed=0) is None  # one prompted layer: no pairs
    assert not torch.allclose(lonely.layers[2].prompts, before)  # ...but the init still ran


def test_apply_pae_switches(exp):
    model = exp.fixed(["prepend", "add"])
    before = _prompts(model)
    off = exp.cfg.pae.model_copy(update={"freq_init": False, "koopman_weight": 0.0, "lyapunov_weight": 0.0})
    assert apply_pae(off, model, exp.data, exp.device, 0) is None
    assert all(torch.equal(a, b) for a, b in zip(before, _prompts(model)))
    reg = apply_pae(exp.cfg.pae.model_copy(update={"freq_init": False}), model, exp.data, exp.device, 0)
    assert isinstance(reg, PAERegularizer) and reg.init_report is None
    assert reg.koopman_weight == 0.1 and reg.K.shape == (32, 32)


def test_search_with_pae_checkpoints_and_resumes(exp, tmp_path):
    full = run_search(exp, tmp_path / "full")
    part = run_search(exp, tmp_path / "part", stop_after=1)
    assert part.epoch == 1
    ckpt = torch.load(tmp_path / "part" / "search.pt", weights_only=True)
    assert set(ckpt["extra"]) == {"W_in.weight", "K", "L"}
    resumed = run_search(exp, tmp_path / "part")
    assert resumed.epoch == full.epoch == exp.cfg.search.epochs
    torch.testing.assert_close(resumed.model.alpha, full.model.alpha, atol=0, rtol=0)
    for (k, a), b in zip(full.extra_loss.state_dict().items(), resumed.extra_loss.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=k)
    assert not torch.allclose(full.extra_loss.K, torch.eye(full.extra_loss.K.shape[0]))  # K was trained
    assert (tmp_path / "full" / "policy.json").is_file()


def test_retrain_with_pae(exp, tmp_path):
    phase = run_retrain(exp, {0: "cross_attn", 1: "prepend"}, tmp_path)
    assert phase.extra_loss is not None and len(phase.history) == exp.cfg.train.epochs
    assert 0.0 <= phase.history[-1]["test_acc"] <= 1.0
    assert torch.load(tmp_path / "retrain.pt", weights_only=True)["extra"] is not None
