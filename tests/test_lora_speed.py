import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from memmcl.experts.backbone import load_backbone
from memmcl.experts.lora_speed import MaskDropout, fuse_lora_forward, set_input_casting


@pytest.fixture(scope="module")
def pair(tiny_dir):
    """peft's LoRA model and a copy whose layers run the fused forward; B drawn so the adapter is not a no-op."""
    base, _ = load_backbone(str(tiny_dir))
    torch.manual_seed(0)
    plain = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                            target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    for name, p in plain.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    fused = copy.deepcopy(plain)
    assert fuse_lora_forward(fused) == 4 * fused.config.num_hidden_layers
    return plain, fused


def _loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids).logits.float().square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fused_forward_equals_peft_in_float32(pair):
    plain, fused = pair
    ids = torch.tensor([[1, 5, 9, 14, 3, 7], [2, 8, 8, 4, 11, 6]])
    loss, grads = _loss_and_grads(plain.train(), ids)
    fused_loss, fused_grads = _loss_and_grads(fused.train(), ids)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_fused_forward_under_autocast_stays_bf16_and_close(pair):
    plain, fused = pair
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        set_input_casting(fused, False)
        out = fused.eval()(input_ids=ids).logits
        set_input_casting(fused, True)
        ref = plain.eval()(input_ids=ids).logits
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=0.05, atol=0.05)


def test_fused_layers_fall_back_to_peft_when_adapters_are_off(pair, tiny_dir):
    _, fused = pair
    ids = torch.tensor([[1, 5, 9, 14]])
    with torch.no_grad():
        with fused.disable_adapter():
            off = fused.eval()(input_ids=ids).logits
        on = fused(input_ids=ids).logits
        base = load_backbone(str(tiny_dir))[0].eval()(input_ids=ids).logits
    torch.testing.assert_close(off, base)
    assert not torch.allclose(on, base)


def test_mask_dropout_keeps_one_minus_p_scaled_and_reproducible():
    x = torch.ones(400, 500, dtype=torch.bfloat16, requires_grad=True)
    drop = MaskDropout(0.1)
    torch.manual_seed(3)
    y = drop(x)
    torch.manual_seed(3)
    assert torch.equal(drop(x), y)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.005  # 200,000 draws: 5 standard deviations is 0.0034
    assert set(y[kept].float().unique().tolist()) == {torch.tensor(1 / 0.9, dtype=torch.bfloat16).item()}
    y.float().sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient goes through the same scaled mask
    assert drop.eval()(x) is x
