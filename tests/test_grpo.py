"""grpo.py: the loss against float64 references, the sampler against full forwards, SFT, load_policy,
and resume equivalence. All on CPU with tiny models."""
import copy
import dataclasses
import math

import pytest
import torch

import data
import grpo
import policy
import sft
from data import UserError

LOSS_TYPES = ("dapo", "grpo", "dr_grpo")


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------


def reference_loss(logp, old, ref, adv, mask, eps_low, eps_high, beta, loss_type, max_new_tokens, num_tokens,
                   weight=lambda i, t: 1.0):
    """The formula token by token, in float64 Python arithmetic on autograd scalars. weight(i, t):
    the importance weight on token t of row i's surrogate (test_mismatch; the KL is never weighted)."""
    N, T = logp.shape
    per_seq, total = [], 0.0
    for i in range(N):
        seq = 0.0
        for t in range(T):
            if mask[i, t] == 0:
                continue
            ratio = torch.exp(logp[i, t] - old[i, t])
            surr = torch.minimum(ratio * adv[i], torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv[i])
            d = torch.clamp(ref[i, t] - logp[i, t], -20, 20)
            seq = seq + (-(weight(i, t) * surr - beta * (torch.exp(d) - d - 1)))
        per_seq.append(seq / max(float(mask[i].sum()), 1.0))
        total = total + seq
    if loss_type == "dapo":
        return total / num_tokens
    if loss_type == "grpo":
        return sum(per_seq) / N
    return total / (N * max_new_tokens)


def random_batch(seed, N=6, T=7):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(N, T, generator=g) * 3
    old = logp + 0.3 * torch.randn(N, T, generator=g)  # ratios far enough from 1 that both clips bind
    ref = logp + 0.5 * torch.randn(N, T, generator=g)
    adv = torch.randn(N, generator=g)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_matches_float64_reference(loss_type):
    logp, old, ref, adv, mask = random_batch(0)
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.04, max_new_tokens=9)
    x = logp.clone().requires_grad_()
    loss, stats = grpo.grpo_loss(x, old, ref, adv, mask, loss_type=loss_type, num_tokens=float(mask.sum()), **kw)
    loss.backward()
    x64 = logp.double().requires_grad_()
    want = reference_loss(x64, old.double(), ref.double(), adv.double(), mask.double(), loss_type=loss_type,
                          num_tokens=float(mask.sum()), **kw)
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)
    assert stats["clip_frac"] > 0 and stats["kl"] > 0
    assert stats["clip_frac"] == pytest.approx(stats["clip_frac/low"] + stats["clip_frac/high"])


def test_first_pass_gradient_is_reinforce_with_group_baseline():
    """At num_iterations=1 old = logp.detach(): ratio == 1, no clipping, and with beta = 0 the
    gradient is REINFORCE with the group mean as baseline: -sum(A_i grad logp_it) / num_tokens."""
    logp, _, ref, _, mask = random_batch(1, N=8)
    rewards = torch.rand(8)
    adv = grpo.group_advantages(rewards, group_size=4)
    x = logp.clone().requires_grad_()
    loss, stats = grpo.grpo_loss(x, x.detach(), ref, adv, mask, eps_low=0.2, eps_high=0.28, beta=0.0,
                                 loss_type="dapo")
    loss.backward()
    baseline = rewards.view(2, 4).mean(1).repeat_interleave(4)
    want = -(rewards - baseline)[:, None] * mask / mask.sum()
    torch.testing.assert_close(x.grad, want)
    assert stats["clip_frac"] == 0


def test_constant_group_has_zero_advantage():
    rewards = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.0, 1.0, 0.0, 1.0])
    for scale in (False, True):
        adv = grpo.group_advantages(rewards, 4, scale_by_std=scale)
        assert torch.all(adv[:4] == 0)
        assert adv[4:].abs().sum() > 0
    torch.testing.assert_close(grpo.group_advantages(rewards, 4)[4:], torch.tensor([-0.5, 0.5, -0.5, 0.5]))


def test_dapo_same_gradient_with_1_or_4_micro_batches():
    logp, old, ref, adv, mask = random_batch(2, N=8)
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.04, loss_type="dapo", num_tokens=float(mask.sum()))
    x1 = logp.clone().requires_grad_()
    grpo.grpo_loss(x1, old, ref, adv, mask, **kw)[0].backward()
    x4 = logp.clone().requires_grad_()
    for mb in (slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)):
        grpo.grpo_loss(x4[mb], old[mb], ref[mb], adv[mb], mask[mb], **kw)[0].backward()
    torch.testing.assert_close(x1.grad, x4.grad)


def test_k3_is_nonnegative_with_the_right_gradient():
    logp = (torch.randn(1000) * 3).requires_grad_()
    ref = torch.randn(1000) * 3
    kl = grpo.k3_kl(logp, ref)
    assert torch.all(kl >= 0)
    kl.sum().backward()
    torch.testing.assert_close(logp.grad, 1 - torch.exp((ref - logp.detach()).clamp(-20, 20)))
    # far apart: clamped, finite
    assert torch.isfinite(grpo.k3_kl(torch.tensor([-200.0]), torch.tensor([0.0]))).all()


# ---------------------------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded_policy(tiny_model_dir):
    return policy.load_policy(tiny_model_dir, device="cpu")


def prompts_of(tok, questions):
    return [data.encode_prompt(tok, [{"role": "user", "content": q}]) for q in questions]


QUESTIONS = ["What is 3 plus 4?", "Please see a doctor about the swelling in your ankle, the report says so.", "Hi"]


def with_eos_bias(model, tok, bias=2.0):
    """A copy whose head favours the stop token, so some rows stop early and some do not."""
    m = copy.deepcopy(model)
    head = torch.nn.Linear(m.config.hidden_size, m.config.vocab_size, bias=True)
    head.weight.data.copy_(m.lm_head.weight.data)
    head.bias.data.zero_()
    head.bias.data[tok.eos_token_id] = bias
    m.lm_head = head
    return m


@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logps_equal_trainer_logps(loaded_policy, lean, temperature):
    model, tok = loaded_policy
    model = with_eos_bias(model, tok)
    ro = policy.generate(model, tok, prompts_of(tok, QUESTIONS), 4, 24, temperature,
                       generator=torch.Generator().manual_seed(0), lean=lean)
    ids, attn, pos = ro.inputs()
    with torch.no_grad():
        logp, _ = policy.completion_logprobs(model, ids, attn, pos, ro.completion.shape[1], temperature)
    assert ro.finished.any() and not ro.finished.all()
    torch.testing.assert_close(logp * ro.mask, ro.logps, atol=1e-4, rtol=0)


def test_stop_token_inside_mask_and_pad_after(loaded_policy):
    model, tok = loaded_policy
    model = with_eos_bias(model, tok)
    ro = policy.generate(model, tok, prompts_of(tok, QUESTIONS), 4, 24, 1.0, generator=torch.Generator().manual_seed(1))
    stops = set(policy.stop_token_ids(tok))
    for i in range(ro.completion.shape[0]):
        n = int(ro.mask[i].sum())
        assert torch.all(ro.mask[i, :n] == 1) and torch.all(ro.mask[i, n:] == 0)  # contiguous
        assert torch.all(ro.completion[i, n:] == tok.pad_token_id)
        toks = ro.completion[i, :n].tolist()
        if ro.finished[i]:
            assert toks[-1] in stops and not stops & set(toks[:-1])
        else:
            assert n == 24 and not stops & set(toks)


def greedy_full_forward(model, tok, prompt, max_new_tokens):
    """The slow obvious decoder: one full forward of the whole sequence per token, no cache, no padding."""
    ids, stops = list(prompt), set(policy.stop_token_ids(tok))
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
            if nxt in stops:
                break
    return out


@pytest.mark.parametrize("lean", [True, False])
def test_cached_greedy_decode_equals_full_forward_greedy(loaded_policy, lean):
    model, tok = loaded_policy
    model = with_eos_bias(model, tok, bias=1.0)
    prompts = prompts_of(tok, QUESTIONS)
    assert len({len(p) for p in prompts}) == 3  # different lengths -> left padding is exercised
    ro = policy.generate(model, tok, prompts, 2, 20, 1.0, greedy=True, lean=lean)
    for i, p in enumerate(prompts):
        want = greedy_full_forward(model, tok, p, 20)
        for row in (2 * i, 2 * i + 1):
            assert ro.completion[row, :int(ro.mask[row].sum())].tolist() == want


def tiny_arch(kind, vocab, tok):
    """Random-init Llama-family models of other shapes: GQA, Qwen2 q/k/v biases, Qwen3 q/k norms."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=256, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    if kind == "llama_gqa_tied":
        return LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True, rope_theta=500.0))
    if kind == "qwen2":
        m = Qwen2ForCausalLM(Qwen2Config(**common))
        for layer in m.model.layers:  # HF inits biases to zero; make them matter
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
        return m
    return Qwen3ForCausalLM(Qwen3Config(**common, head_dim=8))


@pytest.mark.parametrize("kind", ["llama_gqa_tied", "qwen2", "qwen3"])
def test_lean_decoder_equals_hf_decoder(loaded_policy, kind):
    _, tok = loaded_policy
    model = tiny_arch(kind, len(tok), tok).eval()
    assert policy._lean_supported(model, 64)
    prompts = prompts_of(tok, QUESTIONS)
    noise = torch.rand(12, 16, generator=torch.Generator().manual_seed(3))
    lean = policy.generate(model, tok, prompts, 4, 16, 0.8, noise=noise, lean=True)
    hf = policy.generate(model, tok, prompts, 4, 16, 0.8, noise=noise, lean=False)
    assert torch.equal(lean.completion, hf.completion)
    torch.testing.assert_close(lean.logps, hf.logps, atol=1e-4, rtol=0)
    ids, attn, pos = lean.inputs()
    with torch.no_grad():
        logp, _ = policy.completion_logprobs(model, ids, attn, pos, lean.completion.shape[1], 0.8)
    torch.testing.assert_close(logp * lean.mask, lean.logps, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_compiled_decoder_equals_eager_and_compiles_once(loaded_policy):
    """The GPU path (static caches + torch.compile'd decode step) on CPU: same samples as the eager
    decoder, one compiled graph for prompts of different lengths (cache widths round up to 64
    columns), and the persistent weight copy follows the trained weights."""
    from torch._dynamo.utils import counters

    model, tok = loaded_policy
    model = with_eos_bias(model, tok)
    prompts = prompts_of(tok, QUESTIONS)
    counters.clear()
    for i, batch in enumerate([prompts, [prompts[0], prompts[2], prompts[0]]]):  # two prompt widths
        noise = torch.rand(12, 16, generator=torch.Generator().manual_seed(i))
        compiled = policy.generate(model, tok, batch, 4, 16, 0.8, noise=noise, lean=True, compile=True)
        eager = policy.generate(model, tok, batch, 4, 16, 0.8, noise=noise, lean=True)
        assert torch.equal(compiled.completion, eager.completion)
        torch.testing.assert_close(compiled.logps, eager.logps, atol=1e-5, rtol=0)
        with torch.no_grad():  # a training step changes the weights: the next call must see it
            model.lm_head.weight.mul_(1.5)
    assert counters["stats"]["unique_graphs"] == 1


def test_static_caches_keep_addresses_and_evict_the_least_recent():
    policy._static_caches.clear()
    shape = lambda n: ((2, n, 1, 4, 64), (2, n, 1, 64, 4))  # noqa: E731
    first = policy.static_caches(*shape(1), torch.float32, "cpu")
    first[0].fill_(1.0)
    again = policy.static_caches(*shape(1), torch.float32, "cpu")
    assert all(a is b for a, b in zip(first, again)) and not again[0].any()  # same tensors, zeroed
    for n in range(2, policy.MAX_STATIC_SHAPES + 1):
        policy.static_caches(*shape(n), torch.float32, "cpu")
    policy.static_caches(*shape(1), torch.float32, "cpu")  # used again: now the most recent
    policy.static_caches(*shape(99), torch.float32, "cpu")  # one too many: shape 2 goes
    assert len(policy._static_caches) == policy.MAX_STATIC_SHAPES
    assert shape(1)[0] in {k[0] for k in policy._static_caches} and shape(2)[0] not in {k[0] for k in policy._static_caches}
    policy._static_caches.clear()


# ---------------------------------------------------------------------------------------------
# SFT and loading
# ---------------------------------------------------------------------------------------------

CONVS = [[{"role": "user", "content": f"What is {a} plus {b}?"},
          {"role": "assistant", "content": f"The answer is {a + b}."}] for a in range(6) for b in range(6)]


def test_init_is_seeded_and_leaves_the_global_rng_alone(tiny_tokenizer):
    cfg = policy.ModelConfig(hidden=32, layers=2, heads=2, kv_heads=2, intermediate=64, max_positions=64)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b = policy.init_tiny_model(tiny_tokenizer, cfg), policy.init_tiny_model(tiny_tokenizer, cfg)
    c = policy.init_tiny_model(tiny_tokenizer, dataclasses.replace(cfg, seed=1))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_sft_lowers_loss_deterministically_and_calls_back(tiny_tokenizer):
    cfg = sft.SFTConfig(steps=40, batch_size=8, lr=3e-3, warmup=5, log_every=0, seed=1, callback_every=20)
    models, calls = [], []
    for _ in range(2):
        torch.manual_seed(0)
        m = policy.init_tiny_model(tiny_tokenizer, policy.ModelConfig(hidden=32, layers=2, heads=2, kv_heads=2,
                                                                  intermediate=64, max_positions=128))
        losses = sft.sft(m, tiny_tokenizer, CONVS, cfg, callback=lambda step, model: calls.append(step))
        models.append(m)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    assert calls == [0, 20, 40, 0, 20, 40]
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
        assert a.dtype == torch.float32  # bf16 autocast (where the CPU has it) keeps fp32 weights
    # SFT may switch attention to eager for CPU bf16; the model leaves as it came
    assert models[0].config._attn_implementation == "sdpa"


def test_sft_loss_on_learned_positions_only_equals_the_full_logits_loss(tiny_tokenizer, monkeypatch):
    torch.manual_seed(0)
    m = policy.init_tiny_model(tiny_tokenizer, policy.ModelConfig(hidden=32, layers=2, heads=2, kv_heads=2,
                                                              intermediate=64, max_positions=128))
    ids = torch.randint(0, len(tiny_tokenizer), (3, 20))
    targets = ids[:, 1:].masked_fill(torch.rand(3, 19) < 0.6, -100)
    head_only = sft._assistant_loss(m, ids, targets)
    monkeypatch.setattr(sft, "LEAN_ARCHS", ())  # an architecture with extra logit processing: full route
    full = sft._assistant_loss(m, ids, targets)
    assert torch.allclose(head_only, full, atol=1e-6)


@pytest.mark.skipif(not policy.cpu_has_bf16(), reason="this CPU has no native bf16")
def test_sft_cpu_bf16_learns_like_fp32(tiny_tokenizer):
    losses = {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        m = policy.init_tiny_model(tiny_tokenizer, policy.ModelConfig(hidden=32, layers=2, heads=2, kv_heads=2,
                                                                  intermediate=64, max_positions=128))
        cfg = sft.SFTConfig(steps=40, batch_size=8, lr=3e-3, warmup=5, log_every=0, seed=1, cpu_bf16=bf16)
        losses[bf16] = sft.sft(m, tiny_tokenizer, CONVS, cfg)
    assert losses[True] != losses[False]  # the switch really changes the arithmetic ...
    assert abs(sum(losses[True][-5:]) - sum(losses[False][-5:])) / 5 < 0.1  # ... not the learning


def test_load_policy_errors(tmp_path, tiny_model_dir):
    with pytest.raises(UserError, match="cannot load model"):
        policy.load_policy(str(tmp_path / "does-not-exist"))
    import shutil

    from transformers import AutoTokenizer

    path = tmp_path / "no_template"
    shutil.copytree(tiny_model_dir, path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = None
    tok.save_pretrained(path)
    for f in path.glob("chat_template*"):
        f.unlink()
    with pytest.raises(UserError, match="no chat template"):
        policy.load_policy(str(path))


# ---------------------------------------------------------------------------------------------
# The loop: metrics and exact resume
# ---------------------------------------------------------------------------------------------


class FakeSampler:
    """Deterministic in step; rank r gets the r-th contiguous share (whole groups)."""

    def __init__(self, crash_at=None):
        self.crash_at = crash_at

    def batch(self, step, n, rank=0, world=1):
        if step == self.crash_at:
            raise KeyboardInterrupt("killed")
        recs = [{"id": f"{step}/{i}", "prompt": [{"role": "user", "content": QUESTIONS[(step + i) % 3]}]}
                for i in range(n)]
        k = n // world
        return recs[rank * k:(rank + 1) * k]


def fake_rewarder(rec, texts, finished):
    """Reward: the fraction of characters that are 'e' (a token-level signal a tiny model can move)."""
    return [{"score": t.count("e") / max(len(t), 1), "finished": float(f)} for t, f in zip(texts, finished)]


def grpo_cfg(**kw):
    base = dict(steps=4, prompts_per_step=4, group_size=4, max_new_tokens=12, lr=1e-3, micro_batch_size=6,
                checkpoint_every=2, log_every=0, seed=3, num_iterations=2, warmup=1)
    return grpo.GRPOConfig(**{**base, **kw})


def test_train_grpo_metrics(loaded_policy, tmp_path):
    model, tok = loaded_policy
    hist = grpo.train_grpo(copy.deepcopy(model), tok, FakeSampler(), fake_rewarder, grpo_cfg(steps=2, loss_type="grpo", num_iterations=1),
                           str(tmp_path))
    assert len(hist) == 2
    for key in ("reward/mean", "reward/finished", "adv/std", "groups/zero_var_frac", "kl", "clip_frac", "entropy",
                "len/mean", "len/truncated_frac", "logp_gap", "perf/rollout_tok_s", "perf/step_s", "loss", "lr"):
        assert key in hist[-1] and math.isfinite(hist[-1][key]), key
    assert hist[0]["kl"] == pytest.approx(0, abs=1e-6) and hist[1]["kl"] > 0  # policy == ref at step 1
    assert hist[0]["logp_gap"] < 1e-4
    assert (tmp_path / "checkpoint" / "model.safetensors").exists()


def test_token_budget_stops_nearest_the_budget_and_transform_sees_the_step(loaded_policy, tmp_path):
    """token_budget: the loop runs until its sampled tokens are within half a step of the budget
    (compute matching by tokens); reward_transform gets every step's records and rewards."""
    model, tok = loaded_policy
    cfg = grpo_cfg(steps=2, num_iterations=1, checkpoint_every=0)
    seen = []

    def transform(records, outs, step):
        seen.append((step, len(records), len(outs)))
        return outs

    hist = grpo.train_grpo(copy.deepcopy(model), tok, FakeSampler(), fake_rewarder, cfg, str(tmp_path / "a"),
                           token_budget=1, reward_transform=transform)
    assert len(hist) == 1 and seen == [(0, 4, 16)]  # any step overshoots a budget of 1 token: stop after one
    per_step = grpo.step_tokens(hist[0], cfg)
    budget = int(3.2 * per_step)
    hist = grpo.train_grpo(copy.deepcopy(model), tok, FakeSampler(), fake_rewarder, cfg, str(tmp_path / "b"), token_budget=budget)
    total = sum(grpo.step_tokens(h, cfg) for h in hist)
    assert len(hist) > cfg.steps and abs(total - budget) <= max(grpo.step_tokens(h, cfg) for h in hist) / 2 + 1e-6
    assert "len/prompt" in hist[0] and hist[0]["len/prompt"] > 0


def test_resume_after_kill_reproduces_uninterrupted_run(loaded_policy, tmp_path):
    model, tok = loaded_policy
    cfg = grpo_cfg()
    full = copy.deepcopy(model)
    hist_full = grpo.train_grpo(full, tok, FakeSampler(), fake_rewarder, cfg, str(tmp_path / "a"))
    killed = copy.deepcopy(model)
    with pytest.raises(KeyboardInterrupt):
        grpo.train_grpo(killed, tok, FakeSampler(crash_at=2), fake_rewarder, cfg, str(tmp_path / "b"))
    torch.manual_seed(12345)  # the resumed process starts with other RNG states
    resumed = copy.deepcopy(model)  # the initial policy: the reference is built from it
    hist = grpo.train_grpo(resumed, tok, FakeSampler(), fake_rewarder, cfg, str(tmp_path / "b"), resume=True)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert [h["reward/mean"] for h in hist] == [h["reward/mean"] for h in hist_full]
    assert not torch.equal(next(iter(full.parameters())), next(iter(model.parameters())))


def test_gradient_checkpointing_same_steps_and_really_recomputes(loaded_policy, tmp_path):
    """Two GRPO steps with gradient checkpointing end at the same parameters as without it, and it
    really recomputes: a block runs twice per micro-batch with grad on (forward, backward replay).
    The HF sampler (lean off) samples the same after the first update: its KV cache survives."""
    model, tok = loaded_policy
    runs = {}
    for on in (False, True):
        m, calls = copy.deepcopy(model), []
        down = m.model.layers[0].mlp.down_proj  # its forward, wrapped: module hooks do not fire in a replay

        def counted(x, forward=down.forward, calls=calls):
            calls.append(torch.is_grad_enabled())
            return forward(x)

        down.forward = counted
        cfg = grpo_cfg(steps=2, num_iterations=1, lean_sampler=False, gradient_checkpointing=on)
        hist = grpo.train_grpo(m, tok, FakeSampler(), fake_rewarder, cfg, str(tmp_path / str(on)),
                               ref_model=copy.deepcopy(model))
        runs[on] = (m, sum(calls), hist)
    (plain, n_plain, _), (ckpt, n_ckpt, hist) = runs[False], runs[True]
    assert n_ckpt == 2 * n_plain > 0
    for a, b in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert hist[-1]["logp_gap"] < 1e-4
    assert not any(m.training for m in ckpt.modules())  # the policy is left in eval mode


def test_resume_refuses_a_checkpoint_of_the_other_layout(loaded_policy, tmp_path):
    """FSDP saves the optimizer state by parameter name, DDP and 1 rank by index: no silent mix-up."""
    model, tok = loaded_policy
    cfg = grpo_cfg(steps=1)
    grpo.train_grpo(copy.deepcopy(model), tok, FakeSampler(), fake_rewarder, cfg, str(tmp_path))
    path = tmp_path / "checkpoint" / "trainer_state.pt"
    torch.save({**torch.load(path, weights_only=False), "fsdp": True}, path)
    with pytest.raises(UserError, match="saved with FSDP"):
        grpo.train_grpo(copy.deepcopy(model), tok, FakeSampler(), fake_rewarder, cfg, str(tmp_path), resume=True)
