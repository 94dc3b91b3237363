"""bench.py: the bytes a decode step reads, counted by hand, and the JSON line of a tiny run
(subprocess, as a user runs it) with its bandwidth fields."""
import json
import os
import subprocess
import sys

import pytest
import torch

import bench

pytestmark = pytest.mark.slow  # bench.py in a subprocess, timing our sampler against model.generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_decode_bytes_are_weights_without_embedding_plus_valid_kv():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True))
    h, i, kv = 32, 64, 16  # kv width: 2 kv heads x head_dim 8
    weights = 2 * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h + 100 * h  # blocks, final norm, head (tied)
    cache = 2 * 2 * 10 * kv * 7.5  # K and V, 2 layers, 10 rows, 7.5 valid positions on average
    assert bench.decode_bytes_per_step(model, 10, 7.5, torch.float32) == 4 * (weights + cache)
    assert bench.decode_bytes_per_step(model, 10, 7.5, torch.bfloat16) == 2 * (weights + cache)


def test_bench_json_has_decode_bandwidth():
    cmd = [sys.executable, "bench.py", "--hidden", "64", "--layers", "2", "--heads", "2", "--intermediate", "128",
           "--vocab", "500", "--batch", "2", "--group", "4", "--new-tokens", "24", "--steps", "1", "--repeats", "3",
           "--skip-generate", "--judge-responses", "0", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("sample_tokens_per_s", "step_s", "decode_bytes_per_token_step", "decode_bw_gbs", "peak_bw_gbs"):
        assert r[key] > 0, key
    assert 0 < r["bw_frac"] < 1.5
    assert "spec_bw_gbs" not in r  # CUDA only
