"""One GRPO step on 2 ranks (torchrun, gloo) equals one step on 1 rank with the same global batch;
so do two steps under FSDP (resumed from an FSDP checkpoint in between, gradient checkpointing on)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # torchrun with 2 gloo ranks against 1 rank

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The GRPO worker both this file and test_smollm2 start under torchrun. argv: model dir, out dir, a
# JSON job {"questions", "system" (or null), "config": GRPOConfig fields}, then flags (resume).
SCRIPT = textwrap.dedent("""
    import json
    import sys
    sys.path.insert(0, {root!r})
    import grpo
    import policy

    job = json.loads(sys.argv[3])

    class Sampler:  # deterministic in step; rank r gets the r-th contiguous share of whole groups
        def batch(self, step, n, rank=0, world=1):
            qs, system = job["questions"], [{{"role": "system", "content": job["system"]}}] if job["system"] else []
            recs = [{{"prompt": system + [{{"role": "user", "content": qs[(step + i) % len(qs)]}}]}} for i in range(n)]
            k = n // world
            return recs[rank * k:(rank + 1) * k]

    def rewarder(rec, texts, finished):
        return [{{"score": t.count("e") / max(len(t), 1)}} for t in texts]

    rank, world, device = policy.init_distributed()
    model, tok = policy.load_policy(sys.argv[1], device=device)
    cfg = grpo.GRPOConfig(log_every=0, seed=5, **job["config"])
    hist = grpo.train_grpo(model, tok, Sampler(), rewarder, cfg, sys.argv[2], resume="resume" in sys.argv[4:])
    if rank == 0:
        print("REWARD", hist[-1]["reward/mean"], "KL", hist[-1]["kl"])
""")


def tiny_job(loss_type: str, steps: int = 1, fsdp: bool = False) -> str:
    """This file's worker job: 4 prompts x 4 samples x 12 tokens of the tiny model."""
    return json.dumps({"questions": ["What is 3 plus 4?", "Please see a doctor about the swelling.", "Hi", "Reverse the word stone."],
                       "system": None,
                       "config": {"steps": steps, "prompts_per_step": 4, "group_size": 4, "max_new_tokens": 12, "lr": 1e-3,
                                  "micro_batch_size": 3, "loss_type": loss_type,
                                  "grad_clip": 0.01,  # binds (grad norms ~0.02): the global norm must match too
                                  "fsdp": fsdp, "gradient_checkpointing": fsdp}})


def run(cmd, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return [line for line in out.stdout.splitlines() if line.startswith("REWARD")][0]


def test_two_ranks_equal_one_rank(tmp_path, tiny_model_dir):
    script = tmp_path / "step.py"
    script.write_text(SCRIPT.format(root=ROOT))
    for loss_type in ("dapo", "grpo"):
        one = run([sys.executable, str(script), tiny_model_dir, str(tmp_path / f"one_{loss_type}"), tiny_job(loss_type)], tmp_path)
        two = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                   tiny_model_dir, str(tmp_path / f"two_{loss_type}"), tiny_job(loss_type)], tmp_path)
        assert abs(float(one.split()[1]) - float(two.split()[1])) < 1e-6  # the same samples, so the same rewards
        a = load_file(str(tmp_path / f"one_{loss_type}" / "checkpoint" / "model.safetensors"))
        b = load_file(str(tmp_path / f"two_{loss_type}" / "checkpoint" / "model.safetensors"))
        init = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert not torch.equal(a[k], init[k]) or k.endswith("norm.weight"), k  # the step moved the weights
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)


def test_fsdp_two_ranks_equal_one_rank_across_a_resume(tmp_path, tiny_model_dir):
    """FSDP on 2 ranks: step 1, checkpoint, a new process resumes for step 2; the result equals two
    uninterrupted steps on 1 rank (the Adam state survived the gather and the re-shard), and the
    checkpoint FSDP wrote loads as a plain HF model."""
    from transformers import AutoModelForCausalLM

    script = tmp_path / "step.py"
    script.write_text(SCRIPT.format(root=ROOT))
    one = run([sys.executable, str(script), tiny_model_dir, str(tmp_path / "one"), tiny_job("dapo", steps=2)], tmp_path)
    fsdp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
            tiny_model_dir, str(tmp_path / "fsdp")]
    run(fsdp + [tiny_job("dapo", steps=1, fsdp=True)], tmp_path)
    two = run(fsdp + [tiny_job("dapo", steps=2, fsdp=True), "resume"], tmp_path)
    assert abs(float(one.split()[1]) - float(two.split()[1])) < 1e-6
    a = load_file(str(tmp_path / "one" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "fsdp" / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fsdp" / "checkpoint")).state_dict()
    for k in b:
        assert torch.equal(loaded[k], b[k]), k
