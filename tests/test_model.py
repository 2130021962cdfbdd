"""Operators, supernet and policies on a tiny random-init timm ViT."""
from __future__ import annotations

import pytest
import torch

from pfnas.config import BackboneConfig, ModelError, PromptConfig
from pfnas.model import PromptedViT, load_backbone, load_policy, normalize_policy, save_policy


def vpt_deep_reference(bb, prompts: torch.Tensor, head: torch.nn.Linear, img: torch.Tensor) -> torch.Tensor:
    """VPT-deep written from its definition: prompts after CLS, overwritten before every block."""
    x = bb.norm_pre(bb._pos_embed(bb.patch_embed(img)))
    B, M = x.shape[0], prompts.shape[1]
    x = torch.cat([x[:, :1], prompts[0].expand(B, -1, -1), x[:, 1:]], dim=1)
    for i, blk in enumerate(bb.blocks):
        if i > 0:
            x = torch.cat([x[:, :1], prompts[i].expand(B, -1, -1), x[:, 1 + M:]], dim=1)
        x = blk(x)
    return head(bb.norm(x)[:, 0])


def test_all_prepend_equals_vpt_deep(backbone):
    model = PromptedViT(backbone, 5, PromptConfig(length=3, dropout=0.1), policy=["prepend"] * 2).eval()
    prompts = torch.stack([layer.prompts.detach() for layer in model.layers])
    img = torch.randn(4, 3, 16, 16)
    ref = vpt_deep_reference(backbone, prompts, model.head, img)
    torch.testing.assert_close(model(img), ref, rtol=1e-5, atol=1e-5)
    # the prompts matter: perturbing them changes the output
    with torch.no_grad():
        for layer in model.layers:
            layer.prompts.add_(torch.randn_like(layer.prompts))
    assert not torch.allclose(model(img), ref, atol=1e-4)


def test_vpt_init_bound(backbone):
    model = PromptedViT(backbone, 5, PromptConfig(length=50), policy=["prepend"] * 2)
    bound = (6.0 / (3 * 16 + 32)) ** 0.5
    p = model.layers[0].prompts
    assert p.abs().max() <= bound and p.abs().max() > 0.8 * bound


@pytest.mark.parametrize("op", ["affine", "cross_attn"])
def test_zero_init_ops_start_as_identity(backbone, op):
    """affine and cross_attn are zero-initialised: the model starts as the plain frozen backbone."""
    img = torch.randn(2, 3, 16, 16)
    fused = PromptedViT(backbone, 5, PromptConfig(length=3), policy=[op] * 2).eval()
    plain = PromptedViT(backbone, 5, PromptConfig(length=3), policy=["none"] * 2).eval()
    plain.head.load_state_dict(fused.head.state_dict())
    torch.testing.assert_close(fused(img), plain(img))


def _nontrivial_ops_and_alpha(sup: PromptedViT) -> None:
    """Move every op off its identity init and alpha off uniform, so mixtures and gates are tested for real."""
    for layer in sup.layers:
        for op in layer.ops:
            for p in op.parameters():
                torch.nn.init.normal_(p, std=0.2)
    with torch.no_grad():
        sup.alpha.copy_(torch.randn_like(sup.alpha))


def test_mixed_layer_is_weighted_sum_of_ops(backbone):
    torch.manual_seed(1)
    cfg = PromptConfig(length=3, dropout=0.0)
    sup = PromptedViT(backbone, 5, cfg).eval()
    _nontrivial_ops_and_alpha(sup)
    sup.tau = 0.7
    x = sup.embed(torch.randn(2, 3, 16, 16))
    block, layer = backbone.blocks[0], sup.layers[0]
    w = torch.softmax(sup.alpha[0] / 0.7, -1)
    expect = sum(w[i] * layer.run_op(i, block, x, layer.prompts, 1) for i in range(len(layer.ops)))
    got = layer.run_mixed(block, x, [layer.prompts] * len(layer.ops), 1, sup.op_weights()[0])
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)


def test_per_op_prompts_supernet(backbone):
    """Per-op prompts: copies of the shared prompts give the shared supernet's output exactly; each op then
    reads its own set (only the sampled op's set learns on a Gumbel path); a fixed policy keeps one set."""
    torch.manual_seed(2)
    cfg = PromptConfig(length=3, dropout=0.0)
    shared = PromptedViT(backbone, 5, cfg).eval()
    per_op = PromptedViT(backbone, 5, cfg, per_op_prompts=True).eval()
    for a, b in zip(shared.layers, per_op.layers):  # non-trivial ops, same weights in both nets
        for p in a.ops.parameters():
            torch.nn.init.normal_(p, std=0.2)
        b.ops.load_state_dict(a.ops.state_dict())
    with torch.no_grad():
        per_op.alpha.copy_(shared.alpha)
        per_op.head.load_state_dict(shared.head.state_dict())
        for a, b in zip(shared.layers, per_op.layers):
            assert b.prompts.shape == (4, 3, 32)
            b.prompts.copy_(a.prompts.expand_as(b.prompts))
    img = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(per_op(img), shared(img), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        per_op.layers[0].prompts[2].add_(1.0)  # affine's own prompts: the output moves
    assert not torch.allclose(per_op(img), shared(img), atol=1e-4)

    gdas = PromptedViT(backbone, 5, cfg, mode="gumbel", per_op_prompts=True).train()
    for layer in gdas.layers:
        for p in layer.ops.parameters():
            torch.nn.init.normal_(p, std=0.2)
    gdas(img).sum().backward()
    for layer in gdas.layers:
        live = layer.prompts.grad.abs().sum((-1, -2)) > 0
        assert int(live.sum()) == 1  # one op ran: only its prompts got a gradient
    fixed = PromptedViT(backbone, 5, cfg, policy=["add", "prepend"], per_op_prompts=True)
    assert all(layer.prompts.shape == (3, 32) for layer in fixed.layers)


def test_per_op_prompts_refuse_pae():
    from pfnas.config import ExperimentConfig
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="per_op_prompts"):
        ExperimentConfig(search={"per_op_prompts": True}, pae={"enabled": True})


def test_gradient_reaches_prompts_ops_head_and_alpha_only(backbone):
    sup = PromptedViT(backbone, 5, PromptConfig(length=3)).train()
    loss = torch.nn.functional.cross_entropy(sup(torch.randn(4, 3, 16, 16)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert sup.alpha.grad is not None and sup.alpha.grad.abs().sum() > 0
    for layer in sup.layers:
        assert layer.prompts.grad is not None and layer.prompts.grad.abs().sum() > 0
    assert sup.head.weight.grad.abs().sum() > 0
    assert not backbone.training  # frozen backbone stays in eval mode under model.train()


def test_gumbel_single_path_runs_one_op_per_layer(backbone):
    sup = PromptedViT(backbone, 5, PromptConfig(length=3), mode="gumbel").train()
    calls = []
    hooks = [b.register_forward_hook(lambda m, i, o: calls.append(i[0].shape)) for b in backbone.blocks]
    out = sup(torch.randn(4, 3, 16, 16))
    for h in hooks:
        h.remove()
    assert len(calls) == 2 and all(s[0] == 4 for s in calls)  # one block call per layer, batch not tripled
    out.sum().backward()
    assert sup.alpha.grad is not None and sup.alpha.grad.abs().sum() > 0  # straight-through gradient


def test_centered_gumbel_gradient_ignores_the_shared_stream(backbone):
    """Centered GDAS: same forward value; alpha's gradient is <dL/dy, y - block(x)>, so ops that do not change
    the block (affine and cross_attn at their identity init) give alpha no gradient, while the plain
    straight-through estimator still moves it (by the value of rescaling the whole residual stream)."""
    cfg = PromptConfig(length=3, dropout=0.0, ops=["affine", "cross_attn"])
    img = torch.randn(4, 3, 16, 16)
    grads, outs = {}, {}
    for centered in (False, True):
        torch.manual_seed(5)
        sup = PromptedViT(backbone, 5, cfg, mode="gumbel").train()
        sup.centered = centered
        torch.manual_seed(6)  # the same Gumbel path in both runs
        out = sup(img)
        out.pow(2).sum().backward()
        grads[centered], outs[centered] = sup.alpha.grad.clone(), out.detach()
    torch.testing.assert_close(outs[True], outs[False])
    assert grads[False].abs().sum() > 0
    assert grads[True].abs().max() == 0


def test_sigmoid_gates_weigh_each_op_by_its_change(backbone):
    """Gated supernet: ref + sum_k sigmoid(alpha_k / tau) (y_k - ref), ref the prompt-free block; ops at their
    identity init (affine, cross_attn) get no gate gradient while prepend and add do; pinning one gate open
    and the rest shut gives exactly that op's block (what perturbation selection relies on)."""
    torch.manual_seed(2)
    cfg = PromptConfig(length=3, dropout=0.0)
    sup = PromptedViT(backbone, 5, cfg, mode="sigmoid").train()
    sup.tau = 0.7
    img = torch.randn(3, 3, 16, 16)
    sup(img).pow(2).sum().backward()
    g = sup.alpha.grad
    names = sup.candidates
    assert all(g[:, names.index(o)].abs().max() == 0 for o in ("affine", "cross_attn"))
    assert all(g[:, names.index(o)].abs().min() > 0 for o in ("prepend", "add"))
    _nontrivial_ops_and_alpha(sup)
    sup.eval()
    x = sup.embed(img)
    block, layer = backbone.blocks[0], sup.layers[0]
    gates = torch.sigmoid(sup.alpha[0] / 0.7)
    ref = block(x)
    expect = ref + sum(gates[i] * (layer.run_op(i, block, x, layer.prompts, 1) - ref) for i in range(len(layer.ops)))
    got = layer.run_gated(block, x, [layer.prompts] * len(layer.ops), 1, sup.op_weights()[0])
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    k = names.index("cross_attn")
    with torch.no_grad():
        sup.alpha.fill_(-1e4)
        sup.alpha[:, k] = 1e4
    fixed = PromptedViT(backbone, 5, cfg, policy=["cross_attn"] * 2).eval()
    # the fixed model's state: head and prompts as they are, op k's weights renamed to its single op 0, no alpha
    fixed.load_trainable_state_dict({n.replace(f".ops.{k}.", ".ops.0."): v for n, v in sup.trainable_state_dict().items()
                                     if n != "alpha" and (".ops." not in n or f".ops.{k}." in n)})
    torch.testing.assert_close(sup(img), fixed(img), rtol=1e-5, atol=1e-5)


def test_pinned_soft_rows_run_only_their_op_without_changing_the_output(backbone, monkeypatch):
    """A soft supernet evaluated without gradients with a row pinned one-hot (what perturbation and parsimony
    selection do) runs only that op in that layer, and gives the full mixture's output."""
    torch.manual_seed(3)
    sup = PromptedViT(backbone, 5, PromptConfig(length=3, dropout=0.0)).eval()
    _nontrivial_ops_and_alpha(sup)
    with torch.no_grad():
        sup.alpha[1].fill_(-1e4)
        sup.alpha[1, sup.candidates.index("cross_attn")] = 1e4
    img = torch.randn(2, 3, 16, 16)
    full = sup(img).detach()  # gradients on: every op runs in every layer
    calls = []
    real = type(sup.layers[1]).run_op
    monkeypatch.setattr(type(sup.layers[1]), "run_op", lambda self, i, *a: calls.append((self, i)) or real(self, i, *a))
    with torch.no_grad():
        fast = sup(img)
    assert [i for layer, i in calls if layer is sup.layers[1]] == [sup.candidates.index("cross_attn")]
    assert any(layer is sup.layers[0] for layer, _ in calls)  # layer 0 is not pinned: still mixed (length ops)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)


def test_tuned_params_and_discretize(backbone):
    cfg = PromptConfig(length=3, fusion_dim=4)
    assert PromptedViT(backbone, 5, cfg, policy=["add"] * 2).tuned_parameter_count() == 2 * 32 + 32 * 5 + 5  # add stores mean(P)
    assert PromptedViT(backbone, 5, cfg, policy=["none"] * 2).tuned_parameter_count() == 32 * 5 + 5
    sup = PromptedViT(backbone, 5, cfg)
    with torch.no_grad():
        sup.alpha.zero_()
        sup.alpha[0, 2] = 1.0
        sup.alpha[1, 3] = 1.0
    assert sup.discretize() == {0: "affine", 1: "cross_attn"}
    ent = sup.alpha_entropy()
    assert len(ent) == 2 and all(0 < h < 1 for h in ent)


def test_policy_roundtrip_and_validation(tmp_path):
    save_policy({0: "add", 1: "prepend"}, tmp_path / "p.json")
    assert load_policy(tmp_path / "p.json") == {0: "add", 1: "prepend"}
    (tmp_path / "p.yaml").write_text("- affine\n- cross_attn\n")
    assert load_policy(tmp_path / "p.yaml") == {0: "affine", 1: "cross_attn"}
    with pytest.raises(Exception, match="each of the 2 layers"):
        normalize_policy({0: "add"}, 2)
    with pytest.raises(Exception, match="unknown op"):
        normalize_policy(["add", "bogus"], 2)


def test_unknown_model_and_missing_checkpoint():
    with pytest.raises(ModelError, match="unknown timm model"):
        load_backbone(BackboneConfig(name="vit_does_not_exist"))
    with pytest.raises(ModelError, match="not found"):
        load_backbone(BackboneConfig(checkpoint="/nonexistent/w.safetensors"))


def test_proxy_backbone_loads_real_weights(shared_proxy):
    ckpt, _ = shared_proxy
    bb = load_backbone(BackboneConfig(checkpoint=str(ckpt), kwargs={"img_size": 32, "patch_size": 4}))
    from safetensors.torch import load_file

    sd = load_file(str(ckpt))
    torch.testing.assert_close(bb.blocks[3].attn.qkv.weight, sd["blocks.3.attn.qkv.weight"].float())
    assert all(not p.requires_grad for p in bb.parameters())
