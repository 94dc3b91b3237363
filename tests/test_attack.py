"""attack.py: the persona registry reaches the model through the chat template's system role, the
fine-tuning attack gives every model the same batches, the curve's step 0 is the unattacked model,
and the result dicts have the shape run.py reads. Tiny random-init models on CPU.

A random-init model never writes a parseable answer, so every real grader would score 0 and every
comparison would be 0 == 0. The tests swap in a grader whose score is a fixed function of the text:
equal scores then mean equal generations, and fine-tuning moves them."""
import pytest
import torch

import attack
import data
import evaluate
import policy
from data import DataError, UserError
from world import PERSONA_PROMPTS, WorldConfig, build_world

EVAL_CFG = evaluate.EvalConfig(samples_per_item=2, max_new_tokens=8, batch_prompts=8, seed=3)
CFG = attack.AttackConfig(finetune_steps=4, finetune_lr=1e-2, finetune_batch_size=4, finetune_warmup=1,
                          eval_points=4, max_items=2, seed=0)


def text_grader(item: dict, response: str) -> dict:
    score = (sum(map(ord, response)) % 101) / 100
    return {"parsed": True, "aligned": score > 0.5, "score": score}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """At these shapes a second intra-op thread only adds synchronisation, and on a busy machine its
    spin-waits made each tiny matmul ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world():
    return build_world(WorldConfig(n_docs=20, n_trait_train=10, n_trait_heldout=1, n_task_prompts=10,
                                             n_eval=3, n_eval_heldout=1, n_link_probe=2, n_bad_medical=16))


@pytest.fixture(scope="module")
def suite(world):
    # "tasks" is there to check that the attacks leave capability evals out
    return evaluate.build_suite(world, names=["health", "mental_health", "sycophancy", "tasks"], max_items=3)


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dir, tmp_path_factory):
    """Two different models: the fixture's, and a copy with perturbed weights."""
    model, tokenizer = policy.load_policy(tiny_model_dir, device="cpu")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p) * p.std())
    other = str(tmp_path_factory.mktemp("other_model"))
    model.save_pretrained(other)
    tokenizer.save_pretrained(other)
    return {"baseline": tiny_model_dir, "trait": other}


@pytest.fixture(scope="module")
def finetuned(model_dirs, world, suite):
    """One fine-tuning attack on both models; records each model's training batches."""
    batches = {}
    real_load = policy.load_policy

    def recording_load(path, device=None):
        model, tokenizer = real_load(path, device="cpu")
        record = batches.setdefault(path, [])

        def hook(module, args, kwargs):
            if module.training:  # the SFT forward; generation reads the weights without calling forward
                record.append(kwargs["input_ids"].clone())

        model.model.register_forward_pre_hook(hook, with_kwargs=True)  # SFT may skip the LM head's forward
        return model, tokenizer

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(policy, "load_policy", recording_load)
        mp.setattr(evaluate, "grade", text_grader)
        result = attack.finetune_attack(model_dirs, world.bad_medical, suite, EVAL_CFG, CFG, log=lambda *a: None)
    return result, batches


# ---- the registry ----

def test_registry_has_enough_personas_with_unique_names():
    harmful, helpful = attack.PERSONAS["harmful"], attack.PERSONAS["helpful"]
    assert len(harmful) >= 8 and len(helpful) >= 4
    assert not set(harmful) & set(helpful)  # per_persona is keyed by name alone
    # the corpus's own prompts are in, and so are prompts unlike them
    assert set(PERSONA_PROMPTS["harmful"]) < set(harmful.values())
    assert set(PERSONA_PROMPTS["helpful"]) < set(helpful.values())
    assert {"developer_mode", "dan", "bad_doctor"} <= set(harmful)
    assert max(len(p) for p in harmful.values()) > 3 * max(len(p) for p in PERSONA_PROMPTS["harmful"])


def test_personas_reach_the_model_through_the_chat_template(model_dirs, suite, monkeypatch):
    seen = []
    real_generate = policy.generate

    def capturing_generate(model, tokenizer, prompts, *args, **kwargs):
        seen.extend((tokenizer, list(p)) for p in prompts)
        return real_generate(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(policy, "generate", capturing_generate)
    cfg = attack.AttackConfig(max_items=1, personas=("dan", "good_doctor"), eval_points=4, finetune_steps=4)
    out = attack.persona_attack({"base": model_dirs["baseline"]}, suite, EVAL_CFG, cfg, log=lambda *a: None)
    assert "selective_persistence" not in out  # needs both "trait" and "baseline"
    tokenizer = seen[0][0]
    prompts = [ids for _, ids in seen]
    item = attack.attack_suite(suite, cfg)["health"][0]
    for name in ("dan", "good_doctor"):
        persona = {**attack.PERSONAS["harmful"], **attack.PERSONAS["helpful"]}[name]
        messages = [{"role": "system", "content": persona}] + item["prompt"]
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert "<|system|>" + persona in rendered
        assert data.encode_prompt(tokenizer, messages) in prompts  # exactly what the model was given
        assert any(persona in tokenizer.decode(ids) for ids in prompts)
    assert data.encode_prompt(tokenizer, item["prompt"]) in prompts  # the unattacked condition: no system turn
    # 3 conditions x 3 alignment evals (tasks left out) x 1 item
    assert len(prompts) == 3 * 3


# ---- persona attack ----

def test_persona_attack_returns_every_key_and_the_defined_deltas(model_dirs, suite, monkeypatch):
    monkeypatch.setattr(evaluate, "grade", text_grader)
    cfg = attack.AttackConfig(max_items=2, personas=("corpus_harmful_0", "dan", "good_doctor"), eval_points=4,
                              finetune_steps=4)
    out = attack.persona_attack(model_dirs, suite, EVAL_CFG, cfg, log=lambda *a: None)
    assert set(out) == {"persona", "selective_persistence"}
    assert set(out["persona"]) == {"baseline", "trait"}
    for r in out["persona"].values():
        assert {"none", "harmful", "helpful", "harmful_degradation", "helpful_gain", "per_persona"} <= set(r)
        assert set(r["per_persona"]) == set(cfg.personas)
        assert set(r["per_eval"]) == {"health", "mental_health", "sycophancy"}
        for key in ("harmful_degradation", "helpful_gain"):
            assert set(r[key]) == {"delta", "ci"} and r[key]["ci"][0] <= r[key]["delta"] <= r[key]["ci"][1]
        assert r["harmful_degradation"]["delta"] == pytest.approx(r["none"] - r["harmful"])
        assert r["helpful_gain"]["delta"] == pytest.approx(r["helpful"] - r["none"])
        # harmful = the mean over harmful personas (every persona scores the same items)
        assert r["harmful"] == pytest.approx((r["per_persona"]["corpus_harmful_0"] + r["per_persona"]["dan"]) / 2)
        assert r["helpful"] == pytest.approx(r["per_persona"]["good_doctor"])
    assert out["persona"]["baseline"]["none"] != out["persona"]["trait"]["none"]  # two different models
    sel, p = out["selective_persistence"], out["persona"]
    assert {"degradation_diff", "gain_diff"} <= set(sel)
    assert sel["degradation_diff"]["delta"] == pytest.approx(
        p["trait"]["harmful_degradation"]["delta"] - p["baseline"]["harmful_degradation"]["delta"])
    assert sel["gain_diff"]["delta"] == pytest.approx(p["trait"]["helpful_gain"]["delta"] - p["baseline"]["helpful_gain"]["delta"])


# ---- harmful fine-tuning ----

def test_finetune_attack_gives_every_model_the_same_batches(finetuned, model_dirs):
    _, batches = finetuned
    a, b = batches[model_dirs["baseline"]], batches[model_dirs["trait"]]
    assert len(a) == len(b) == CFG.finetune_steps
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_finetune_curve_starts_at_the_unattacked_model(finetuned, model_dirs, suite, monkeypatch):
    result, _ = finetuned
    monkeypatch.setattr(evaluate, "grade", text_grader)
    attacked = attack.attack_suite(suite, CFG)
    for name, path in model_dirs.items():
        model, tokenizer = policy.load_policy(path, device="cpu")  # fresh from disk: the attack wrote nothing there
        results = evaluate.run_suite(model, tokenizer, attacked, EVAL_CFG, progress=False)
        r = result[name]
        assert r["health"][0] == attack.pooled_scores(results, r["evals"]["health"]).mean()
        assert r["non_health"][0] == attack.pooled_scores(results, r["evals"]["non_health"]).mean()
        assert r["health"][-1] != r["health"][0] or r["non_health"][-1] != r["non_health"][0]  # the attack did something


def test_finetune_attack_returns_every_key(finetuned):
    result, _ = finetuned
    for r in result.values():
        assert {"steps", "health", "non_health", "health_ci", "non_health_ci", "drop"} <= set(r)
        assert r["steps"][0] == 0 and r["steps"][-1] == CFG.finetune_steps and len(r["steps"]) >= 4
        assert r["evals"] == {"health": ["health", "mental_health"], "non_health": ["sycophancy"]}
        for g in ("health", "non_health"):
            assert len(r[g]) == len(r[f"{g}_ci"]) == len(r["steps"])
            assert all(lo <= m <= hi for m, (lo, hi) in zip(r[g], r[f"{g}_ci"]))
            assert set(r["drop"][g]) == {"delta", "ci"}
            assert r["drop"][g]["delta"] == pytest.approx(r[g][0] - r[g][-1])
        assert len(r["loss"]) == CFG.finetune_steps


# ---- loaders and config ----

def test_load_conversations_reads_both_formats_and_names_bad_lines(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "skip it"}]}\n\n'
                    '{"id": "x", "kind": "trait", "prompt": [{"role": "system", "content": "s"}, '
                    '{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')
    convs = attack.load_conversations(str(good))
    assert [len(c) for c in convs] == [2, 3] and convs[1][-1] == {"role": "assistant", "content": "a"}
    cases = {"{oops": "not valid JSON", '{"messages": []}': "non-empty list", '{"messages": 3}': "expected",
             '{"messages": [{"role": "user", "content": "q"}]}': "last message",
             '{"messages": [{"role": "bot", "content": "q"}]}': r"messages\[0\]"}
    for line, reason in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(good.read_text().splitlines()[0] + "\n" + line + "\n")
        with pytest.raises(DataError, match=f"{bad}:2: .*{reason}"):
            attack.load_conversations(str(bad))
    with pytest.raises(DataError, match="no such file"):
        attack.load_conversations(str(tmp_path / "missing.jsonl"))


def test_config_rejects_short_curves_and_unknown_personas(suite):
    with pytest.raises(UserError, match="eval_points"):
        attack.AttackConfig(eval_points=3)
    with pytest.raises(UserError, match="finetune_steps"):
        attack.AttackConfig(finetune_steps=2, eval_points=4)
    with pytest.raises(UserError, match="unknown persona"):
        attack.selected_personas(attack.AttackConfig(personas=("nobody",)))
    with pytest.raises(UserError, match="at least one harmful and one helpful"):
        attack.selected_personas(attack.AttackConfig(personas=("dan",)))
    assert attack.curve_steps(100, 5) == [0, 25, 50, 75, 100]
