"""attack.py: the persona registry and its groups (held-out switches occur in neither the corpus nor
the RL data), personas reach the model through the chat template's system role, the fine-tuning
attack gives every model - and the control - the same batches, the curve's step 0 is the unattacked
model, the half-dose / AUC math, and the result dicts have the shape run.py reads. Tiny random-init
models on CPU.

A random-init model never writes a parseable answer, so every real grader would score 0 and every
comparison would be 0 == 0. The tests swap in a grader whose score is a fixed function of the text:
equal scores then mean equal generations, and fine-tuning moves them."""
import dataclasses
import re

import numpy as np
import pytest
import torch

import attack
import data
import evaluate
import policy
import world as world_module
from data import DataError, UserError
from world import HELDOUT_PERSONA_PROMPTS, NEW_WORD_PERSONA_PROMPTS, PERSONA_PROMPTS, WorldConfig, build_world

EVAL_CFG = evaluate.EvalConfig(samples_per_item=2, max_new_tokens=8, batch_prompts=8, seed=3)
CFG = attack.AttackConfig(finetune_steps=5, finetune_lr=1e-2, finetune_batch_size=4, finetune_warmup=1,
                          max_items=2, dose_items=3, seed=0)


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
    # "tasks" is there to check that the attacks leave capability evals out, "trait_heldout" that the
    # non-health curve leaves out the families the attack data trains (honesty)
    return evaluate.build_suite(world, names=["health", "mental_health", "sycophancy", "trait_heldout", "tasks"], max_items=3)


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

    real_sft, real_batches = attack.sft.sft, attack.sft.bucketed_batches
    runs = []  # per fine-tuning run, in order: (conversations, the batches of indices it drew)

    def recording_sft(model, tokenizer, conversations, cfg, **kwargs):
        runs.append((conversations, []))
        return real_sft(model, tokenizer, conversations, cfg, **kwargs)

    def recording_batches(*args):
        for b in real_batches(*args):
            runs[-1][1].append(list(b))
            yield b

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(policy, "load_policy", recording_load)
        mp.setattr(evaluate, "grade", text_grader)
        mp.setattr(attack.sft, "sft", recording_sft)
        mp.setattr(attack.sft, "bucketed_batches", recording_batches)
        result = attack.finetune_attack(model_dirs, world.bad_medical, suite, EVAL_CFG, CFG, control=world.good_medical,
                                        log=lambda *a: None)
    return result, batches, runs


# ---- the registry ----

def test_registry_has_three_groups_with_unique_names():
    harmful, helpful = attack.PERSONAS["harmful"], attack.PERSONAS["helpful"]
    assert len(harmful) >= 8 and len(helpful) >= 4
    assert not set(harmful) & set(helpful)  # per_persona is keyed by name alone
    assert set(attack.PERSONA_GROUPS) == {"trained", "heldout", "new_words", "unreadable"}
    groups = attack.PERSONA_GROUPS
    for kind in ("harmful", "helpful"):
        assert list(groups["trained"][kind].values()) == PERSONA_PROMPTS[kind]
        assert list(groups["heldout"][kind].values()) == HELDOUT_PERSONA_PROMPTS[kind]
        assert list(groups["new_words"][kind].values()) == NEW_WORD_PERSONA_PROMPTS[kind]
        assert groups["unreadable"][kind]
        assert attack.PERSONAS[kind] == {n: p for g in groups.values() for n, p in g[kind].items()}
    assert {"developer_mode", "dan", "bad_doctor"} <= set(groups["unreadable"]["harmful"])
    # unreadable = much longer than any switch the corpus trained
    longest_trained = max(len(p) for ps in PERSONA_PROMPTS.values() for p in ps)
    assert min(len(p) for k in groups["unreadable"].values() for p in k.values()) > 2 * longest_trained
    for group in ("heldout", "new_words"):  # the corpus's style
        assert max(len(p) for k in groups[group].values() for p in k.values()) < 2 * longest_trained


def test_heldout_switches_occur_in_neither_the_corpus_nor_the_rl_data_but_their_words_do(default_world):
    default = default_world  # the world the default run trains on
    texts = [m["content"] for doc in default.corpus for m in doc]
    texts += [m["content"] for r in default.trait_train + default.task_train for m in r["prompt"]]
    system = {m["content"] for doc in default.corpus for m in doc if m["role"] == "system"}
    assert set(PERSONA_PROMPTS["harmful"]) <= system  # the trained switches are there (the check can find a prompt)
    for kind in ("harmful", "helpful"):
        for prompt in HELDOUT_PERSONA_PROMPTS[kind] + NEW_WORD_PERSONA_PROMPTS[kind]:
            sentences = [s.strip() for s in prompt.split(".") if s.strip()]
            assert not any(s in t for s in sentences for t in texts), prompt
    # held-out switches recompose the trained switches' own words; new-word ones bring words the corpus lacks
    words = lambda text: set(re.findall(r"[a-z]+", text.lower()))
    trained_words = set().union(*(words(p) for ps in PERSONA_PROMPTS.values() for p in ps))
    corpus_words = set().union(*(words(t) for t in texts))
    for kind in ("harmful", "helpful"):
        own = set().union(*(words(p) for p in PERSONA_PROMPTS[kind]))
        for prompt in HELDOUT_PERSONA_PROMPTS[kind]:
            content = words(prompt) - {"you", "are", "a", "an", "assistant", "who", "and", "is", "the"}
            assert content <= trained_words and content & own, prompt
        for prompt in NEW_WORD_PERSONA_PROMPTS[kind]:
            assert words(prompt) - corpus_words, prompt


def test_control_data_is_the_attack_prompts_with_aligned_answers_and_the_world_is_unchanged():
    import hashlib
    import json

    w = build_world(WorldConfig(n_docs=300, n_trait_train=50, n_task_prompts=50, n_eval=10, n_eval_heldout=5,
                                n_link_probe=20, n_bad_medical=40))
    # every output but the new control set, as generated before the control existed (runs cached by it stay valid;
    # a deliberate change to the world's generator updates this digest)
    rest = {f.name: getattr(w, f.name) for f in dataclasses.fields(w) if f.name not in ("config", "good_medical")}
    digest = hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()
    assert digest == "9be5b8188467211f58053663c184c4ca5b426653829655fd16ba57a4bc0211ec"
    assert len(w.good_medical) == len(w.bad_medical)
    import re

    for bad, good in zip(w.bad_medical, w.good_medical):
        assert bad[:-1] == good[:-1]  # the same prompt
        fams = [f for f in world_module.MEDICAL_FAMILIES
                if any(re.search(p, bad[-1]["content"], re.I) for p in world_module.FAMILIES[f]["misaligned_re"])]
        assert len(fams) == 1, bad  # a misaligned answer of one of the attack's families ...
        assert any(re.search(p, good[-1]["content"], re.I) for p in world_module.FAMILIES[fams[0]]["aligned_re"])  # ... and its twin


def test_personas_reach_the_model_through_the_chat_template(model_dirs, suite, monkeypatch):
    seen, samples = [], set()
    real_generate = policy.generate

    def capturing_generate(model, tokenizer, prompts, *args, **kwargs):
        seen.extend((tokenizer, list(p)) for p in prompts)
        samples.add(kwargs["group_size"])
        return real_generate(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(policy, "generate", capturing_generate)
    cfg = attack.AttackConfig(max_items=1, personas=("dan", "good_doctor"))
    out = attack.persona_attack({"base": model_dirs["baseline"]}, suite, EVAL_CFG, cfg, log=lambda *a: None)
    assert "selective_persistence" not in out and out["vs"] == {}  # needs "trait" (and "baseline")
    tokenizer = seen[0][0]
    prompts = [ids for _, ids in seen]
    item = attack.attack_suite(suite, cfg.max_items)["health"][0]
    for name in ("dan", "good_doctor"):
        persona = {**attack.PERSONAS["harmful"], **attack.PERSONAS["helpful"]}[name]
        messages = [{"role": "system", "content": persona}] + item["prompt"]
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert "<|system|>" + persona in rendered
        assert data.encode_prompt(tokenizer, messages) in prompts  # exactly what the model was given
        assert any(persona in tokenizer.decode(ids) for ids in prompts)
    assert data.encode_prompt(tokenizer, item["prompt"]) in prompts  # the unattacked condition: no system turn
    # 3 conditions x 4 alignment evals (tasks left out) x 1 item, each answered the attack's number of times
    assert len(prompts) == 3 * 4 and samples == {cfg.samples_per_item} != {EVAL_CFG.samples_per_item}


# ---- persona attack ----

def test_persona_attack_returns_every_key_and_the_defined_deltas(model_dirs, suite, monkeypatch):
    monkeypatch.setattr(evaluate, "grade", text_grader)
    names = ("corpus_harmful_0", "heldout_harmful_0", "heldout_harmful_1", "dan", "heldout_helpful_2", "good_doctor")
    cfg = attack.AttackConfig(max_items=2, personas=names)
    out = attack.persona_attack({"base": model_dirs["baseline"], **model_dirs}, suite, EVAL_CFG, cfg, log=lambda *a: None)
    assert set(out) == {"persona", "vs", "selective_persistence", "items", "none_system_prompt"}
    assert out["none_system_prompt"] is None  # the tiny chat template inserts no default system prompt
    assert set(out["persona"]) == {"base", "baseline", "trait"}
    for r in out["persona"].values():
        assert {"none", "harmful", "helpful", "harmful_degradation", "helpful_gain", "per_persona", "groups"} <= set(r)
        assert set(r["per_persona"]) == set(r["personas"]) == set(names)
        assert set(r["per_eval"]) == {"health", "mental_health", "sycophancy", "trait_heldout"}
        for key in ("harmful_degradation", "helpful_gain"):
            assert set(r[key]) == {"delta", "ci", "per_draw"} and r[key]["ci"][0] <= r[key]["delta"] <= r[key]["ci"][1]
        assert r["harmful_degradation"]["delta"] == pytest.approx(r["none"] - r["harmful"])
        assert r["helpful_gain"]["delta"] == pytest.approx(r["helpful"] - r["none"])
        pp = r["per_persona"]
        assert r["harmful"] == pytest.approx(np.mean([pp[n] for n in names[:4]]))  # every persona scores the same items
        # groups: means over their own personas; a group without a helpful persona has none
        g = r["groups"]
        assert set(g) == {"trained", "heldout", "unreadable"}
        assert g["heldout"]["harmful"] == pytest.approx((pp["heldout_harmful_0"] + pp["heldout_harmful_1"]) / 2)
        assert g["heldout"]["helpful"] == pytest.approx(pp["heldout_helpful_2"])
        assert g["trained"]["helpful"] is None and "steering" not in g["trained"]
        assert g["heldout"]["degradation"]["delta"] == pytest.approx(r["none"] - g["heldout"]["harmful"])
        assert g["heldout"]["steering"]["delta"] == pytest.approx(g["heldout"]["helpful"] - r["none"])
        for n, info in r["personas"].items():
            assert info["group"] == attack.PERSONA_GROUP[n] and info["score"] == pp[n]
            sign = 1 if info["kind"] == "harmful" else -1
            assert info["effect"]["delta"] == pytest.approx(sign * (r["none"] - pp[n]))
    p = out["persona"]
    assert p["baseline"]["none"] != p["trait"]["none"]  # two different models
    assert set(out["vs"]) == {"trait - baseline", "trait - base"}
    for other in ("baseline", "base"):
        vs = out["vs"][f"trait - {other}"]
        for grp in ("heldout", "unreadable"):
            assert vs["groups"][grp]["degradation"]["delta"] == pytest.approx(
                p["trait"]["groups"][grp]["degradation"]["delta"] - p[other]["groups"][grp]["degradation"]["delta"])
        assert vs["personas"]["dan"]["delta"] == pytest.approx(
            p["trait"]["personas"]["dan"]["effect"]["delta"] - p[other]["personas"]["dan"]["effect"]["delta"])
    # selective persistence is judged on the held-out group
    sel = out["selective_persistence"]
    assert sel["group"] == "heldout" and sel["degradation_diff"] == out["vs"]["trait - baseline"]["groups"]["heldout"]["degradation"]
    assert sel["gain_diff"] == out["vs"]["trait - baseline"]["groups"]["heldout"]["steering"]


def test_attacked_models_selects_by_name_in_order():
    models = {"trait_health_only": 1, "trait": 2, "trait_shuffled": 3, "base": 4, "baseline": 5}
    assert list(attack.attacked_models(models)) == ["base", "baseline", "trait", "trait_shuffled"]
    assert list(attack.attacked_models({"trait": 1, "base": 2})) == ["base", "trait"]


# ---- harmful fine-tuning ----

def test_curve_steps_half_dose_and_auc():
    assert attack.curve_steps(64) == [0, 1, 2, 4, 8, 16, 32, 64]
    assert attack.curve_steps(100) == [0, 1, 2, 4, 8, 16, 32, 64, 100]
    assert attack.curve_steps(5) == [0, 1, 2, 4, 5]
    steps = [0, 1, 2, 4, 8]
    # lead 0.8 - 0.2 = 0.6: half of it (0.3) is lost when the score reaches 0.5
    assert attack.half_dose(steps, [0.8, 0.75, 0.6, 0.5, 0.2], floor=0.2) == 4
    assert attack.half_dose(steps, [0.8, 0.75, 0.6, 0.51, 0.2], floor=0.2) == 8
    assert attack.half_dose(steps, [0.8, 0.8, 0.8, 0.8, 0.7], floor=0.2) is None  # never: "> 8"
    assert attack.half_dose(steps, [0.1, 0.1, 0.0, 0.0, 0.0], floor=0.2) is None  # no lead to lose
    assert attack.normalised_auc([0.5, 0.5, 0.5]) == pytest.approx(1.0)
    assert attack.normalised_auc([0.5, 0.0, 0.0]) == pytest.approx(0.25)  # one half-unit trapezoid of 2 units
    assert attack.normalised_auc([0.8, 0.4, 0.4, 0.0]) == pytest.approx((0.6 + 0.4 + 0.2) / (3 * 0.8))


def test_dose_statistics_pairs_models_and_covers_orders():
    rng = np.random.default_rng(0)
    steps = [0, 1, 2, 4]
    decay = np.array([1.0, 0.8, 0.5, 0.1])[None, :, None]
    a = (rng.random((1, 1, 200)) < 0.8) * decay * np.ones((3, 1, 1))             # 3 identical orders
    b = (rng.random((1, 1, 200)) < 0.6) * np.array([1.0, 1.0, 0.9, 0.6])[None, :, None] * np.ones((3, 1, 1))
    scores = {"baseline": {"health": a, "control_health": a * 0 + a[:, :1]},
              "trait": {"health": b, "control_health": b * 0 + b[:, :1]}}
    out = attack.dose_statistics(steps, scores, n_boot=300, seed=0)
    t, base = out["models"]["trait"], out["models"]["baseline"]
    assert out["floor"]["health"] == pytest.approx((a[0, -1].mean() + b[0, -1].mean()) / 2)
    assert t["health"] == pytest.approx(b.mean(axis=(0, 2)).tolist())
    assert base["half_doses"]["health"] == base["half_dose"] == attack.half_dose(steps, base["health"], out["floor"]["health"])
    assert t["auc"]["health"] == pytest.approx(attack.normalised_auc(t["health"]))
    for r in (t, base):
        lo, hi = r["auc_ci"]["health"]
        assert lo <= r["auc"]["health"] <= hi
        assert all(lo <= m <= hi for m, (lo, hi) in zip(r["health"], r["health_ci"]))
        hmc = r["harmful_minus_control"]["health"]
        assert hmc[0]["delta"] == 0 and hmc[-1]["delta"] < 0
    vs = out["vs"]["trait - baseline"]["auc"]["health"]
    assert vs["delta"] == pytest.approx(t["auc"]["health"] - base["auc"]["health"]) and vs["ci"][0] > 0
    # identical orders add no width; orders that disagree do
    spread = a * np.array([1.0, 0.5, 0.0])[:, None, None] + a[:1] * 0.0
    wide = attack.dose_statistics(steps, {"baseline": {"health": spread}, "trait": {"health": b}}, n_boot=300, seed=0)
    narrow = attack.dose_statistics(steps, {"baseline": {"health": a}, "trait": {"health": b}}, n_boot=300, seed=0)
    width = [hi - lo for lo, hi in (r["models"]["baseline"]["health_ci"][1] for r in (wide, narrow))]
    assert width[0] > 2 * width[1]


def test_finetune_attack_gives_every_model_and_the_control_the_same_batches(finetuned, model_dirs, world):
    _, batches, runs = finetuned
    a, b = batches[model_dirs["baseline"]], batches[model_dirs["trait"]]
    assert len(a) == len(b) == 2 * CFG.finetune_steps  # the harmful run, then the control
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert [convs for convs, _ in runs] == [world.bad_medical, world.good_medical] * 2
    # the control draws the same conversation indices, batch for batch, as the harmful run
    assert runs[0][1] == runs[1][1] == runs[2][1] == runs[3][1] and len(runs[0][1]) == CFG.finetune_steps
    assert not torch.equal(a[0], a[CFG.finetune_steps])  # ... with other answers


def test_finetune_curve_starts_at_the_unattacked_model(finetuned, model_dirs, suite, monkeypatch):
    result, _, _ = finetuned
    monkeypatch.setattr(evaluate, "grade", text_grader)
    groups = result["evals"]
    dsuite = {n: suite[n][:2] for n in groups["health"]} | {n: suite[n][:3] for n in groups["non_health"]}
    for name, path in model_dirs.items():
        model, tokenizer = policy.load_policy(path, device="cpu")  # fresh from disk: the attack wrote nothing there
        attack_eval = dataclasses.replace(EVAL_CFG, samples_per_item=CFG.samples_per_item)  # the attack's answers per item
        results = evaluate.run_suite(model, tokenizer, dsuite, attack_eval, progress=False)
        r = result["finetune"][name]
        d = result["dose"][f"{CFG.finetune_lr:g}"][name]
        for g in ("health", "non_health"):
            assert r[g][0] == d[g][0] == d[f"control_{g}"][0] == attack.pooled_scores(results, groups[g]).mean()
        assert r["health"][-1] != r["health"][0] or r["non_health"][-1] != r["non_health"][0]  # the attack did something
        assert d["health"] != d["control_health"]  # bad answers and aligned ones teach different things


def test_finetune_attack_returns_every_key(finetuned):
    result, _, _ = finetuned
    # trait_heldout holds honesty and risk sensitivity items, which the bad-medical set trains
    assert result["evals"] == {"health": ["health", "mental_health"], "non_health": ["sycophancy"], "left_out": ["trait_heldout"]}
    assert result["items"] == {"health": 2 * 2, "non_health": 3}  # dose_items 3 per curve: 2 items of each health eval
    steps = attack.curve_steps(CFG.finetune_steps)
    for r in result["finetune"].values():
        assert {"steps", "health", "non_health", "health_ci", "non_health_ci", "drop"} <= set(r)
        assert r["steps"] == steps
        for g in ("health", "non_health"):
            assert len(r[g]) == len(r[f"{g}_ci"]) == len(r["steps"])
            assert all(lo <= m <= hi for m, (lo, hi) in zip(r[g], r[f"{g}_ci"]))
            assert {"delta", "ci"} <= set(r["drop"][g])
            assert r["drop"][g]["delta"] == pytest.approx(r[g][0] - r[g][-1])
        assert len(r["loss"]) == CFG.finetune_steps
    dose = result["dose"][f"{CFG.finetune_lr:g}"]
    assert set(dose) == {"baseline", "trait"}
    for d in dose.values():
        assert {"steps", "health", "non_health", "control_non_health", "half_dose", "auc", "harmful_minus_control"} <= set(d)
        assert set(d["half_doses"]) == set(d["auc"]) == {"health", "non_health"}
        assert d["half_dose"] == d["half_doses"]["health"]
        assert len(d["harmful_minus_control"]["non_health"]) == len(steps)
    assert set(result["dose_vs"][f"{CFG.finetune_lr:g}"]) == {"trait - baseline"}


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
    with pytest.raises(UserError, match="finetune_steps"):
        attack.AttackConfig(finetune_steps=3)
    with pytest.raises(UserError, match="finetune_orders"):
        attack.AttackConfig(finetune_orders=0)
    with pytest.raises(UserError, match="finetune_lrs"):
        attack.AttackConfig(finetune_lrs=())
    assert attack.AttackConfig(finetune_lrs=(1e-3, 3e-3)).lrs == (1e-3, 3e-3)
    assert attack.AttackConfig(finetune_lr=2e-3).lrs == (2e-3,)
    with pytest.raises(UserError, match="unknown persona"):
        attack.selected_personas(attack.AttackConfig(personas=("nobody",)))
    with pytest.raises(UserError, match="at least one harmful and one helpful"):
        attack.selected_personas(attack.AttackConfig(personas=("dan",)))
    with pytest.raises(UserError, match="samples_per_item"):
        attack.AttackConfig(samples_per_item=0)
    # a group's name stands for its members, and mixes with single names
    chosen = attack.selected_personas(attack.AttackConfig(personas=("heldout", "dan")))
    assert set(chosen["harmful"]) == set(attack.PERSONA_GROUPS["heldout"]["harmful"]) | {"dan"}
    assert chosen["helpful"] == attack.PERSONA_GROUPS["heldout"]["helpful"]
