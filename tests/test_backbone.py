import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memmcl.experts.backbone import TinyBackboneConfig, build_tiny_backbone, load_backbone, load_tokenizer
from memmcl.experts.backbone_cache import BackboneError

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ["the food was good", "the service was bad", "Answer: positive negative neutral"] * 20


def test_tiny_backbone_round_trips_with_identical_logits(tmp_path):
    built = build_tiny_backbone(tmp_path / "a", TinyBackboneConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                                                   num_attention_heads=2, num_key_value_heads=1), CORPUS)
    model, tokenizer = load_backbone(str(built))
    model.save_pretrained(tmp_path / "b")
    tokenizer.save_pretrained(tmp_path / "b")
    again, tokenizer_again = load_backbone(str(tmp_path / "b"))
    ids = tokenizer(["the food was good", "bad"], return_tensors="pt", padding=True)
    with torch.no_grad():
        a = model(**ids).logits
        b = again(**ids).logits
    assert torch.equal(a, b)
    assert model.config.vocab_size == len(tokenizer)  # sized from the trained tokenizer, not the request
    assert tokenizer_again("the food")["input_ids"] == tokenizer("the food")["input_ids"]
    assert tokenizer.pad_token == "<pad>" and tokenizer.padding_side == "left"


def test_tiny_build_is_deterministic(tmp_path):
    cfg = TinyBackboneConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)
    m1, _ = load_backbone(str(build_tiny_backbone(tmp_path / "1", cfg, CORPUS)))
    m2, _ = load_backbone(str(build_tiny_backbone(tmp_path / "2", cfg, CORPUS)))
    for (n, p1), p2 in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(p1, p2), n


def test_registered_tiny_backbone_loads_through_from_pretrained(tiny_dir, tiny):
    model, tokenizer = tiny
    assert (tiny_dir / "config.json").exists() and (tiny_dir / "tokenizer.json").exists()
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.model_type == "llama"


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(BackboneError, match="no such directory"):
        load_backbone(str(tmp_path / "nope"))


def test_directory_without_model_is_a_clear_error(tmp_path):
    with pytest.raises(BackboneError, match=r"no config.json"):
        load_backbone(str(tmp_path))


def test_file_instead_of_directory_is_a_clear_error(tmp_path):
    f = tmp_path / "model.bin"
    f.write_text("x")
    with pytest.raises(BackboneError, match="got a file"):
        load_backbone(str(f))


def test_directory_without_tokenizer_is_a_clear_error(tmp_path, tiny_dir):
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    with pytest.raises(BackboneError, match=f"{tmp_path}: cannot build a tokenizer"):
        load_tokenizer(str(tmp_path))


def test_hub_name_offline_is_a_clear_error():
    with pytest.raises(BackboneError, match="not-a-real-org/not-a-model"):
        load_backbone("not-a-real-org/not-a-model")


def test_cli_lists_subcommands_and_prints_config():
    out = subprocess.run([sys.executable, "-m", "memmcl", "--help"], capture_output=True, text=True, check=True).stdout
    for sub in ("fit", "validate", "test", "predict"):
        assert sub in out
    cfg = subprocess.run([sys.executable, "-m", "memmcl", "fit", "--config", str(ROOT / "configs/demo/expert.yaml"), "--print_config"],
                         capture_output=True, text=True, check=True).stdout
    assert "class_path: memmcl.experts.expert.LoRAExpert" in cfg
    assert "backbone: tiny" in cfg and "task: sc_binary" in cfg
