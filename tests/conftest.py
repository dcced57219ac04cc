import os

import pytest
import torch

# Built backbones go to one cache per test session, so the suite never depends on a user's ~/.cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    if "MEMMCL_TEST_CACHE" in os.environ:  # reuse across runs when a developer asks for it
        os.environ["MEMMCL_CACHE"] = os.environ["MEMMCL_TEST_CACHE"]
    else:
        os.environ["MEMMCL_CACHE"] = str(tmp_path_factory.mktemp("memmcl-cache"))
    torch.set_num_threads(2)
    yield


@pytest.fixture(autouse=True)
def _float32_by_default(monkeypatch):
    """The suite's numbers must not depend on the CPU it runs on: `trainer.precision: null` (auto) resolves to
    float32 here, as on a CPU without native bf16; bf16 tests ask for it explicitly (tests/test_precision.py)."""
    monkeypatch.setattr("memmcl.precision.cpu_bf16_flags", lambda *args: [])


@pytest.fixture(scope="session")
def tiny_dir():
    from memmcl.experts.backbone import resolve_tiny

    return resolve_tiny()


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    from memmcl.experts.backbone import load_backbone

    model, tokenizer = load_backbone(str(tiny_dir))
    model.eval()
    return model, tokenizer
