"""Genome switch time: MultiLoRAModel rescaling vs peft `add_weighted_adapter` (linear, svd), T = 3, 8, 15 experts.

Also the max abs logit difference of each merge to the brute-force W0 + Σ w_t scale_t B_t A_t. Prints one JSON object.
Model: a Llama shaped like the tiny backbone but wider (built from config, random weights); LoRA r=8 on all 7
projections. Run: `python benchmarks/merge_switch.py`.
"""

from __future__ import annotations

import copy
import itertools
import json
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from memmcl.merging.factors import LoRAFactors
from memmcl.merging.multilora import MultiLoRAModel

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cycling_switch(multi: MultiLoRAModel, genomes: list[torch.Tensor], fold: bool):
    """Returns a call that sets the next genome of the cycle."""
    it = itertools.cycle(genomes)
    return lambda: multi.set_genome(next(it), fold=fold)


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    config = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=640, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2)
    base = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 2048, (2, 32))
    results = {"model": "llama hidden 256, 4 layers, LoRA r=8 on 7 projections", "experts": {}}
    for T in (3, 8, 15):
        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                                     init_lora_weights=False), adapter_name="e0")
        for t in range(1, T):
            peft_model.add_adapter(f"e{t}", LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False))
        factors = []
        for t in range(T):
            mods = {}
            for name, m in peft_model.base_model.model.named_modules():
                if hasattr(m, "lora_A") and f"e{t}" in m.lora_A:
                    with torch.no_grad():
                        m.lora_B[f"e{t}"].weight.normal_(0, 0.05)
                    mods[name] = (m.lora_A[f"e{t}"].weight.detach().clone(), m.lora_B[f"e{t}"].weight.detach().clone(), m.scaling[f"e{t}"])
            factors.append(LoRAFactors(f"e{t}", mods))
        weights = torch.rand(T, generator=torch.Generator().manual_seed(T)) + 0.2

        brute = copy.deepcopy(base)
        with torch.no_grad():
            for name, m in brute.named_modules():
                if isinstance(m, torch.nn.Linear) and name in factors[0].modules:
                    m.weight += sum(float(weights[t]) * f.modules[name][2] * f.modules[name][1] @ f.modules[name][0]
                                    for t, f in enumerate(factors))
            reference = brute(input_ids=ids).logits

        multi = MultiLoRAModel(copy.deepcopy(base), factors)
        genomes = [torch.rand(T) for _ in range(64)]
        switch = timed(cycling_switch(multi, genomes, fold=False), 300)
        fold = timed(cycling_switch(multi, genomes, fold=True), 20)
        with torch.no_grad():
            multi.set_genome(weights)
            diff_factors = float((multi(input_ids=ids).logits - reference).abs().max())
            multi.set_genome(weights, fold=True)
            diff_fold = float((multi(input_ids=ids).logits - reference).abs().max())

        row = {"rescale_ms": switch * 1e3, "fold_ms": fold * 1e3,
               "max_abs_diff": {"rescale": diff_factors, "fold": diff_fold}}
        for combination in ("linear", "svd"):
            names = [f"e{t}" for t in range(T)]

            def rebuild(combination=combination, names=names, peft_model=peft_model, weights=weights):
                peft_model.add_weighted_adapter(names, weights.tolist(), "merged", combination_type=combination)
                peft_model.set_adapter("merged")
                peft_model.delete_adapter("merged")

            row[f"peft_{combination}_ms"] = timed(rebuild, 3 if combination == "svd" else 5) * 1e3
            peft_model.add_weighted_adapter(names, weights.tolist(), "merged", combination_type=combination)
            peft_model.set_adapter("merged")
            with torch.no_grad():
                row["max_abs_diff"][f"peft_{combination}"] = float((peft_model(input_ids=ids).logits - reference).abs().max())
            peft_model.delete_adapter("merged")
            row[f"speedup_vs_peft_{combination}"] = row[f"peft_{combination}_ms"] / row["rescale_ms"]
        results["experts"][T] = row
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
