"""The real-model paths of run.py, offline: --model and --judge with tiny random-init hub
architectures (Llama, Qwen2) saved like hub models (a local path loads exactly as a hub name does),
also under torchrun; a tokenizer without a chat template; GSM8K task data (loader and an RL run);
a GGUF path that is missing or not GGUF; gguf/accelerate imported only for GGUF (the conversion
itself runs on the real SmolLM2 file in test_smollm2.py).
The models' answers are noise: what is tested is that every path runs and which grader it used."""
import itertools
import json
import os
import re
import subprocess
import sys

import pytest

import data
import reward
from world import WorldConfig, build_world

pytestmark = pytest.mark.slow  # run.py subprocesses with tiny hub-format models, also under torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
MODELS = ("base", "baseline", "trait")


def run_py(*args, launcher=(sys.executable,)):
    return subprocess.run([*launcher, os.path.join(ROOT, "run.py"), *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Random-init Llama and Qwen2 (hidden 32, 2 layers) with a BPE trained on the world's text,
    and a copy of the Llama whose tokenizer has no chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    small = WorldConfig(n_docs=200, n_trait_train=20, n_task_prompts=20, n_eval=4, n_eval_heldout=2,
                             n_link_probe=4, n_bad_medical=8)
    tok = data.build_tokenizer(list(itertools.islice(build_world(small).texts(), 400)), vocab_size=400)
    shape = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                 intermediate_size=64, max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    dirs = {}
    for name, model_cls, config_cls in (("llama", LlamaForCausalLM, LlamaConfig), ("qwen2", Qwen2ForCausalLM, Qwen2Config)):
        torch.manual_seed(0)
        dirs[name] = str(tmp_path_factory.mktemp(name))
        model_cls(config_cls(**shape)).save_pretrained(dirs[name])
        tok.save_pretrained(dirs[name])
    dirs["no_template"] = str(tmp_path_factory.mktemp("no_template"))
    LlamaForCausalLM(LlamaConfig(**shape)).save_pretrained(dirs["no_template"])
    tok.chat_template = None
    tok.save_pretrained(dirs["no_template"])
    return dirs


def check_judged_report(out: str, judge: str, proc) -> None:
    """report.json has every eval for base, baseline and trait, graded by the LLM judge: a judge
    reads every answer, so rubric evals parse 100% (a random model's answers never parse by pattern),
    while the standard tasks (no rubrics) keep their exact-answer grader."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"[eval] rubric items graded by the LLM judge {judge}" in proc.stdout
    with open(os.path.join(out, "smoke", "report.json")) as f:
        report = json.load(f)
    assert report["config"]["run"]["judge"] == judge
    assert set(report["comparisons"]) == {"trait"}
    for name, per_model in report["evals"].items():
        assert set(per_model) == set(MODELS), name
        assert all(0 <= r["score"] <= 1 and r["n"] > 0 for r in per_model.values()), name
        if name != "tasks":
            assert all(p == 1.0 for p in report["parsed"][name].values()), name


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_model_and_judge_end_to_end(tmp_path, model_dirs, arch):
    proc = run_py("--preset", "smoke", "--model", model_dirs[arch], "--judge", model_dirs[arch], "--arms", "baseline,trait",
                  "--stage", "eval", "--eval-max-items", "4", "--out-dir", str(tmp_path))
    check_judged_report(str(tmp_path), model_dirs[arch], proc)
    assert "pretraining" not in proc.stdout  # --model skips the base stage's SFT
    # nothing is written next to the user's model (a hub name has no folder to write in)
    assert not [f for f in os.listdir(model_dirs[arch]) if f.startswith("eval-")]


def test_model_and_judge_under_torchrun(tmp_path, model_dirs):
    """The same on 2 gloo ranks: RL groups, generation and judge grading are split, rank 0 writes."""
    proc = run_py("--preset", "smoke", "--model", model_dirs["llama"], "--judge", model_dirs["llama"],
                  "--arms", "baseline,trait", "--stage", "eval", "--eval-max-items", "4", "--out-dir", str(tmp_path),
                  launcher=TORCHRUN)
    check_judged_report(str(tmp_path), model_dirs["llama"], proc)
    assert proc.stdout.count("| eval |") == 1


def test_model_without_chat_template_is_one_line_exit_2(tmp_path, model_dirs):
    proc = run_py("--preset", "smoke", "--model", model_dirs["no_template"], "--arms", "baseline", "--stage", "rl",
                  "--out-dir", str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "chat template" in lines[0]


GSM8K_ROWS = [
    {"question": "Ann has 40 apples and buys 2 more. How many apples does she have?",
     "answer": "She has 40 + 2 = <<40+2=42>>42 apples.\n#### 42"},
    {"question": "A shop sells 1,000 pens and then 234 more. How many pens did it sell?",
     "answer": "1,000 + 234 = 1,234\n#### 1,234"},
    {"question": "A bus carries 1,200 people a day for 2 days. How many people is that?",
     "answer": "1,200 * 2 = 2,400\n#### 2,400"},
]


@pytest.fixture
def gsm8k_file(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GSM8K_ROWS))
    return path


def test_gsm8k_loader(gsm8k_file):
    records = data.load_gsm8k(str(gsm8k_file))
    assert [r["answer"] for r in records] == ["42", "1234", "2400"]
    assert all(r["kind"] == "task" and r["family"] == "gsm8k" for r in records)
    assert records[1]["prompt"] == [{"role": "user", "content": GSM8K_ROWS[1]["question"] + "\n\n" + data.GSM8K_INSTRUCTION}]
    for text in ("Answer: 42", "The answer is 42.", "42.0"):  # what the verifier accepts for "42"
        assert reward.task_reward(records[0], text) == 1.0, text
    assert reward.task_reward(records[1], "Answer: 1,234") == 1.0
    assert reward.task_reward(records[0], "Answer: 43") == 0.0


@pytest.mark.parametrize("bad, message", [
    ({"question": "How many?", "answer": "no final answer"}, "must end with '#### <final answer>'"),
    ({"question": "How many?"}, "needs string fields 'question' and 'answer'"),
])
def test_gsm8k_bad_line_names_file_and_line(gsm8k_file, bad, message):
    with open(gsm8k_file, "a") as f:
        f.write(json.dumps(bad) + "\n")
    with pytest.raises(data.DataError, match=re.escape(f"{gsm8k_file}:4: ") + ".*" + re.escape(message)):
        data.load_gsm8k(str(gsm8k_file))


def test_gsm8k_task_data_rl_run(tmp_path, model_dirs, gsm8k_file):
    proc = run_py("--preset", "smoke", "--model", model_dirs["llama"], "--task-data", f"gsm8k:{gsm8k_file}",
                  "--arms", "baseline", "--stage", "rl", "--out-dir", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"[world] 3 task records from gsm8k:{gsm8k_file}" in proc.stdout
    (arm,) = [d for d in os.listdir(tmp_path / "out" / "smoke") if d.startswith("rl-baseline")]
    with open(tmp_path / "out" / "smoke" / arm / "DONE") as f:
        assert len(json.load(f)["history"]) == 4  # the smoke preset's 4 GRPO steps (no trait arm: no token budget)


@pytest.mark.parametrize("flag", ["--model", "--judge"])
def test_gguf_missing_or_not_gguf_is_one_line_exit_2(tmp_path, flag):
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"PK\x03\x04 not a GGUF file")
    for path, message in ((tmp_path / "absent.gguf", "no such file"), (not_gguf, "not GGUF")):
        proc = run_py("--preset", "smoke", flag, str(path), "--stage", "base", "--out-dir", str(tmp_path / "out"))
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and flag in lines[0] and message in lines[0], lines


def test_gguf_and_accelerate_are_imported_only_for_gguf():
    """A machine without gguf or accelerate runs everything but GGUF conversion: importing every
    module of the project imports neither."""
    code = ("import sys, run, bench; bad = sorted({m.split('.')[0] for m in sys.modules} & {'gguf', 'accelerate'}); "
            "print(bad); sys.exit(bool(bad))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
