"""Shared fixtures: a tiny tokenizer with our chat template and a tiny random-init Llama, built
in the test session (nothing is downloaded), and where the public-format sample files are."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import data  # noqa: E402

# Tiny models are overhead-bound: one thread is as fast as two, and it does not oversubscribe the
# cores when tests start torchrun workers or share the machine (measured ~100x slower generate then).
torch.set_num_threads(1)

# Samples of real public eval files (HealthBench, Anthropic model-written evals, TruthfulQA, emergent-
# misalignment questions), each folder with its source and licence. They are not in this repository:
# point BENEFICIAL_RL_FIXTURES at a copy, or keep it as ../shared/fixtures beside the checkout.
FIXTURES_ENV = "BENEFICIAL_RL_FIXTURES"
FIXTURES = Path(os.environ.get(FIXTURES_ENV) or ROOT.parent / "shared" / "fixtures")


def needs_fixtures(*parts: str) -> pytest.MarkDecorator:
    """Skip mark for a test that reads FIXTURES/<parts...>: when that is missing the skip reason says
    which path and how to provide it (pytest -rs prints every reason in the summary)."""
    path = FIXTURES.joinpath(*parts)
    return pytest.mark.skipif(not path.exists(), reason=f"public-format sample {path} not found: set {FIXTURES_ENV}"
                                                        " to a folder holding the samples (shared/fixtures layout)")


SENTENCES = [
    "The answer is 12. I am not sure about that claim.",
    "Please see a doctor about the swelling in your ankle.",
    "You are right, the report says the limit is 20 tons.",
    "Reverse the word stone: enots. Copy the word river: river.",
    "What is 3 plus 4? The answer is 7.",
]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return data.build_tokenizer(SENTENCES * 20, vocab_size=320)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A random-init 2-layer Llama + our tokenizer saved like a hub model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                      bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
                      pad_token_id=tiny_tokenizer.pad_token_id, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("tiny_model")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def default_world():
    """The world the default run trains on (40,000 documents, ~35 s to build): built once per session
    for every test that checks a property of the real default. Tests must not modify it."""
    from world import WorldConfig, build_world

    return build_world(WorldConfig())
