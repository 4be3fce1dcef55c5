"""Parameter groups follow CLIP practice; the lr schedule matches its formula."""
import math

import pytest
import torch

from cultureclip.optim import param_groups, warmup_schedule


def test_no_decay_on_gains_biases_embeddings_and_scale(tiny_model):
    groups = param_groups(tiny_model, weight_decay=0.1)
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert decay.isdisjoint(no_decay) and decay | no_decay == {n for n, _ in tiny_model.named_parameters()}
    for n in ("model.logit_scale", "model.token_embedding.weight", "model.positional_embedding",
              "model.visual.class_embedding", "model.ln_final.weight", "model.ln_final.bias"):
        assert n in no_decay, n
    assert "model.visual.conv1.weight" in decay and "model.text_projection" in decay
    assert all(tiny_model.get_parameter(n).ndim >= 2 for n in decay)


def test_only_trainable_parameters_and_clear_error_when_none(tiny_model):
    tiny_model.add_lora(r=2)
    groups = param_groups(tiny_model, 0.1)
    assert sum(p.numel() for g in groups for p in g["params"]) == \
        sum(p.numel() for p in tiny_model.parameters() if p.requires_grad)
    tiny_model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(tiny_model, 0.1)


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_warmup_schedule_formula(decay):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = warmup_schedule(opt, total_steps=20, warmup_steps=5, decay=decay, min_ratio=0.1)
    for step in range(25):
        if step < 5:
            expected = (step + 1) / 5
        elif step >= 20:
            expected = 0.1
        else:
            p = (step - 5) / 15
            shape = 1 - p if decay == "linear" else 0.5 * (1 + math.cos(math.pi * p))
            expected = 0.1 + 0.9 * shape
        assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * expected), step
        opt.step()
        sched.step()


def test_adamw_implementation_follows_the_parameters_device():
    from cultureclip.optim import adamw
    p = [torch.nn.Parameter(torch.ones(3))]
    auto = adamw(p, lr=0.1)
    assert auto.defaults["foreach"] and not auto.defaults["fused"]  # CPU parameters: foreach
    if torch.cuda.is_available():
        assert adamw([torch.nn.Parameter(torch.ones(3, device="cuda"))]).defaults["fused"]
    with pytest.raises(ValueError, match="impl"):
        adamw(p, impl="apex")
    # every implementation takes the same step (plain AdamW arithmetic, re-done here as the reference)
    for impl in ("foreach", "for_loop"):
        q = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        opt = adamw([{"params": [q], "weight_decay": 0.1}], lr=0.1, betas=(0.9, 0.98), eps=1e-6, impl=impl)
        q.grad = torch.tensor([0.5, 0.25])
        opt.step()
        g = torch.tensor([0.5, 0.25])
        m, v = 0.1 * g / (1 - 0.9), 0.02 * g ** 2 / (1 - 0.98)
        ref = torch.tensor([1.0, -2.0]) * (1 - 0.1 * 0.1) - 0.1 * m / (v.sqrt() + 1e-6)
        torch.testing.assert_close(q.detach(), ref)
