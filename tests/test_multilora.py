import copy
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from memmcl.experts.backbone import load_backbone
from memmcl.merging.factors import MergeError, read_lora_factors
from memmcl.merging.methods import dare_drop, dare_linear, dare_ties, magnitude_trim, ties
from memmcl.merging.multilora import MultiLoRAModel

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_adapter(tiny_dir, out, seed, r, targets=TARGETS, rslora=False):
    """A peft adapter with non-zero random factors (peft's default B = 0 would make every delta zero)."""
    torch.manual_seed(seed)
    model, _ = load_backbone(str(tiny_dir))
    config = LoraConfig(r=r, lora_alpha=2 * r + seed, target_modules=targets, init_lora_weights=False, use_rslora=rslora)
    peft_model = get_peft_model(model, config)
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(p, std=0.1)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [
        random_adapter(tiny_dir, root / "a", 1, 4),
        random_adapter(tiny_dir, root / "b", 2, 8, rslora=True),
        random_adapter(tiny_dir, root / "c", 3, 2, targets=["q_proj", "v_proj", "down_proj"]),
    ]


def brute_force_model(tiny_dir, adapters, coef):
    """W0 + Σ_t coef[block(layer), t] · ΔW_t written into the weights, ΔW_t taken from peft's own merge."""
    base, _ = load_backbone(str(tiny_dir))
    pristine = copy.deepcopy(base)
    w0 = {n: p.detach().clone() for n, p in base.named_parameters()}
    merged = dict(base.named_parameters())
    n_layers = base.config.num_hidden_layers
    for t, path in enumerate(adapters):
        peft_model = PeftModel.from_pretrained(copy.deepcopy(pristine), path).merge_and_unload()
        for n, p in peft_model.named_parameters():
            delta = p.detach() - w0[n]
            if delta.abs().max() > 0:
                layer = int(n.split(".layers.")[1].split(".")[0])
                with torch.no_grad():
                    merged[n] += coef[layer * coef.shape[0] // n_layers, t] * delta
    return base.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("n_blocks", [1, 2])
def test_genome_switch_equals_brute_force_merge(tiny_dir, adapters, n_blocks):
    base, _ = load_backbone(str(tiny_dir))
    multi = MultiLoRAModel(base, [read_lora_factors(p) for p in adapters], n_blocks=n_blocks)
    ids = torch.randint(5, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    for seed in range(3):  # several switches on the same model, each exact
        coef = torch.rand((n_blocks, 3), generator=torch.Generator().manual_seed(seed)) * 1.5 - 0.25
        multi.set_genome(coef if n_blocks > 1 else coef[0])
        expected = logits(brute_force_model(tiny_dir, adapters, coef), ids)
        torch.testing.assert_close(logits(multi, ids), expected, atol=1e-4, rtol=1e-4)
        multi.set_genome(multi.genome, fold=True)  # the folded form gives the same model
        torch.testing.assert_close(logits(multi, ids), expected, atol=1e-4, rtol=1e-4)
    multi.set_genome(torch.zeros(3))  # back from folded: W0 is restored exactly
    plain, _ = load_backbone(str(tiny_dir))
    assert torch.equal(logits(multi, ids), logits(plain, ids))


def test_per_block_genome_differs_from_shared_one(tiny_dir, adapters):
    base, _ = load_backbone(str(tiny_dir))
    multi = MultiLoRAModel(base, [read_lora_factors(p) for p in adapters], n_blocks=2)
    ids = torch.randint(5, 500, (1, 10), generator=torch.Generator().manual_seed(1))
    multi.set_genome(torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    shared = logits(multi, ids)
    multi.set_genome(torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(logits(multi, ids), shared)
    multi.set_genome(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))  # second block drops the expert
    assert not torch.allclose(logits(multi, ids), shared)
    with pytest.raises(MergeError, match=r"expected \(3,\) or \(2, 3\)"):
        multi.set_genome(torch.ones(4))


def test_exported_adapter_and_model_reproduce_the_merge(tiny_dir, adapters, tmp_path):
    base, tokenizer = load_backbone(str(tiny_dir))
    multi = MultiLoRAModel(base, [read_lora_factors(p) for p in adapters])
    multi.set_genome(torch.tensor([0.7, -0.3, 1.2]))
    ids = torch.randint(5, 500, (2, 9), generator=torch.Generator().manual_seed(2))
    expected = logits(multi, ids)
    fresh, _ = load_backbone(str(tiny_dir))
    peft_model = PeftModel.from_pretrained(fresh, multi.save_adapter(tmp_path / "adapter")).eval()
    torch.testing.assert_close(logits(peft_model, ids), expected, atol=1e-4, rtol=1e-4)
    full, _ = load_backbone(str(multi.save_model(tmp_path / "model", tokenizer)))
    torch.testing.assert_close(logits(full, ids), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits(multi, ids), expected)  # saving left the factor form in place


def test_ties_and_dare_merge_in_the_model_equal_the_functions(tiny_dir, adapters):
    base, _ = load_backbone(str(tiny_dir))
    multi = MultiLoRAModel(base, [read_lora_factors(p) for p in adapters[:2]])
    w = torch.tensor([0.6, 0.9])
    name = "model.layers.1.mlp.down_proj"
    deltas = multi.expert_deltas(name)
    w0 = multi.wrapped[name].base.weight.detach().clone()
    multi.set_genome(w, method="ties", density=0.3)
    torch.testing.assert_close(multi.wrapped[name].base.weight - w0, ties(deltas, w, 0.3), atol=1e-6, rtol=1e-5)
    multi.set_genome(w, method="dare_linear", density=0.5, seed=7)
    first = multi.wrapped[name].base.weight.detach().clone()
    multi.set_genome(w, method="dare_linear", density=0.5, seed=7)  # a fixed seed: the same mask every genome
    assert torch.equal(multi.wrapped[name].base.weight, first)
    with pytest.raises(MergeError, match="no exact low-rank form"):
        multi.save_adapter("unused")


def test_wrong_backbone_is_named(tiny_dir, adapters, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(MergeError, match="wrong backbone"):
        MultiLoRAModel(other, [read_lora_factors(adapters[0])])
    with pytest.raises(MergeError, match="adapter_config.json"):
        read_lora_factors(tmp_path)


# --- merge methods against element-by-element references ---------------------------------------------------------


def _ties_reference(stack: list[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    """Element by element: the sign of the unweighted sum is elected (0 elects +), agreeing weighted entries averaged."""
    shape = stack[0].shape
    out = torch.zeros(shape)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in shape]).tolist():
        raw = [float(d[tuple(idx)]) for d in stack]
        sign = 1 if sum(raw) >= 0 else -1
        agreeing = [float(w[t]) * v for t, v in enumerate(raw) if v != 0 and (v > 0) == (sign > 0)]
        out[tuple(idx)] = sum(agreeing) / len(agreeing) if agreeing else 0.0
    return out


def test_magnitude_trim_and_ties_against_loops():
    g = torch.Generator().manual_seed(0)
    deltas = torch.randn(3, 4, 5, generator=g)
    w = torch.tensor([0.5, 1.0, -0.7])
    density = 0.47
    k = int(density * 20)  # peft's count: int(9.4) = 9
    trimmed = []
    for d in deltas:
        threshold = sorted(d.flatten().abs().tolist(), reverse=True)[k - 1]
        trimmed.append(torch.where(d.abs() >= threshold, d, torch.zeros_like(d)))
        assert torch.equal(magnitude_trim(d, density), trimmed[-1])
    torch.testing.assert_close(ties(deltas, w, density), _ties_reference(trimmed, w))


@pytest.mark.parametrize("density", [0.2, 0.5, 0.75, 1.0])
def test_ties_equals_peft(density):
    from peft.utils.merge_utils import dare_ties as peft_dare_ties
    from peft.utils.merge_utils import ties as peft_ties

    deltas = torch.randn(4, 6, 7, generator=torch.Generator().manual_seed(3))
    w = torch.tensor([0.9, 0.1, 1.4, 0.0])  # a zero weight still votes in the sign election, as in peft
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that density 1 prunes nothing
        expected = peft_ties(list(deltas.clone()), w.clone(), density)
        torch.testing.assert_close(ties(deltas, w, density), expected)
        if density == 1.0:  # DARE draws peft's mask from the global RNG; with nothing dropped both are exact
            torch.testing.assert_close(dare_ties(deltas, w, density), peft_dare_ties(list(deltas.clone()), w.clone(), density))


def test_dare_against_loops():
    deltas = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1))
    w = torch.tensor([0.3, 1.1])
    density = 0.6
    reference_rng = torch.Generator().manual_seed(5)  # one generator, drawn task by task
    masks = [torch.rand(3, 4, generator=reference_rng) < density for _ in range(2)]
    dropped = [torch.where(masks[t], deltas[t] / density, torch.zeros(3, 4)) for t in range(2)]
    assert 0 < sum(int(m.sum()) for m in masks) < 24  # something was dropped, something kept
    assert torch.equal(dare_drop(deltas[0], density, torch.Generator().manual_seed(5)), dropped[0])
    expected_linear = torch.zeros(3, 4)
    for i in range(3):
        for j in range(4):
            expected_linear[i, j] = sum(float(w[t]) * float(dropped[t][i, j]) for t in range(2))
    expected_ties = _ties_reference(dropped, w)
    torch.testing.assert_close(dare_linear(deltas, w, density, torch.Generator().manual_seed(5)), expected_linear)
    torch.testing.assert_close(dare_ties(deltas, w, density, torch.Generator().manual_seed(5)), expected_ties)
