"""The sampler/trainer mismatch: truncated importance weights (`grpo.mismatch_weights`), the weighted
loss against a float64 reference written here, and the mismatch KL a bf16 sampler shows after one
`train_grpo` step against an fp32 one. All on CPU with tiny models."""
import copy
import math

import pytest
import torch
from test_grpo import reference_loss

import grpo
import policy
from data import UserError

LOSS_TYPES = ("dapo", "grpo", "dr_grpo")
CAP = 2.0


# ---------------------------------------------------------------------------------------------
# The weights
# ---------------------------------------------------------------------------------------------


def known_batch():
    """Two rows, 3 and 2 completion tokens; trainer/sampler ratios chosen by hand; pads carry junk."""
    ratios = [[0.5, 1.0, 3.0], [2.5, 1.5]]
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    sampler = torch.tensor([[-1.0, -2.0, -3.0, 0.0], [-0.5, -1.5, 0.0, 0.0]])  # 0 on pads, as Rollout.logps
    old = torch.full((2, 4), -7.0)  # the trainer's log-probs of pads are whatever the model says
    for i, row in enumerate(ratios):
        for t, r in enumerate(row):
            old[i, t] = sampler[i, t] + math.log(r)
    return ratios, old, sampler, mask


def test_token_weights_known_values():
    ratios, old, sampler, mask = known_batch()
    w, stats = grpo.mismatch_weights(old, sampler, mask, "token", CAP)
    torch.testing.assert_close(w * mask, torch.tensor([[0.5, 1.0, 2.0, 0.0], [2.0, 1.5, 0.0, 0.0]]))
    assert torch.isfinite(w).all()
    assert stats["mismatch/trunc_frac"] == pytest.approx(2 / 5)  # 3.0 and 2.5 of five tokens
    k3 = [r - 1 - math.log(r) for row in ratios for r in row]  # r = trainer / sampler, tokens from the sampler
    assert stats["mismatch/kl"] == pytest.approx(sum(k3) / 5, rel=1e-6)


def test_sequence_weights_known_values():
    ratios, old, sampler, mask = known_batch()
    w, stats = grpo.mismatch_weights(old, sampler, mask, "sequence", CAP)
    # row 0: 0.5 * 1 * 3 = 1.5 (below the cap); row 1: 2.5 * 1.5 = 3.75 -> 2 (truncated)
    torch.testing.assert_close(w, torch.tensor([[1.5] * 4, [2.0] * 4]))
    assert stats["mismatch/trunc_frac"] == pytest.approx(1 / 2)  # of sequences
    # an overflowing sequence (sum of log-ratios 1000) is truncated to the cap, not inf or nan
    w, stats = grpo.mismatch_weights(old + 200.0 * mask, sampler, mask, "sequence", CAP)
    assert torch.equal(w, torch.full((2, 4), CAP)) and stats["mismatch/trunc_frac"] == 1.0


def test_off_gives_no_weights_but_token_level_stats():
    ratios, old, sampler, mask = known_batch()
    w, stats = grpo.mismatch_weights(old, sampler, mask, "off", CAP)
    assert w is None
    assert stats == grpo.mismatch_weights(old, sampler, mask, "token", CAP)[1]
    with pytest.raises(UserError, match="tis must be one of"):
        grpo.mismatch_weights(old, sampler, mask, "seq", CAP)


def test_equal_logps_give_unit_weights_and_zero_kl():
    _, old, _, mask = known_batch()
    for level in ("token", "sequence"):
        w, stats = grpo.mismatch_weights(old, old.clone(), mask, level, CAP)
        assert torch.equal(w * mask, mask)
        assert stats == {"mismatch/kl": 0.0, "mismatch/trunc_frac": 0.0}


# ---------------------------------------------------------------------------------------------
# The weighted loss
# ---------------------------------------------------------------------------------------------


def reference_tis_loss(logp, old, sampler, ref, adv, mask, level, cap, eps_low, eps_high, beta, loss_type,
                       max_new_tokens, num_tokens):
    """The formula token by token in float64 Python arithmetic on autograd scalars: the truncated
    weight min(pi_trainer_old / pi_sampler, cap) (per token, or of the whole sequence) multiplies the
    clipped surrogate; the k3 KL penalty is not weighted."""
    def weight(i, t):
        log_w = (float(old[i, t] - sampler[i, t]) if level == "token" else
                 sum(float(old[i, s] - sampler[i, s]) for s in range(logp.shape[1]) if mask[i, s] != 0))
        return min(math.exp(log_w), cap)

    return reference_loss(logp, old, ref, adv, mask, eps_low, eps_high, beta, loss_type, max_new_tokens, num_tokens,
                          weight=weight)


def mismatched_batch(seed, N=6, T=7):
    """Policy, old, sampler and reference log-probs where both clips bind and the sampler is far
    enough from the trainer that some token and some sequence weights exceed the cap, some do not."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(N, T, generator=g) * 3
    old = logp + 0.3 * torch.randn(N, T, generator=g)
    sampler = old - 0.6 * torch.randn(N, T, generator=g)  # |log w| ~ 0.6: exp > 2 on ~12% of tokens
    ref = logp + 0.5 * torch.randn(N, T, generator=g)
    adv = torch.randn(N, generator=g)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    return logp, old, sampler * mask, ref, adv, mask


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_tis_loss_matches_float64_reference(level, loss_type):
    logp, old, sampler, ref, adv, mask = mismatched_batch(0)
    w, stats = grpo.mismatch_weights(old, sampler, mask, level, CAP)
    assert 0 < stats["mismatch/trunc_frac"] < 1  # the cap binds somewhere, not everywhere
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.04, max_new_tokens=9)
    x = logp.clone().requires_grad_()
    loss, stats = grpo.grpo_loss(x, old, ref, adv, mask, loss_type=loss_type, num_tokens=float(mask.sum()),
                                 is_weights=w, **kw)
    loss.backward()
    x64 = logp.double().requires_grad_()
    want = reference_tis_loss(x64, old.double(), sampler.double(), ref.double(), adv.double(), mask.double(), level,
                              CAP, loss_type=loss_type, num_tokens=float(mask.sum()), **kw)
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)
    assert stats["clip_frac"] > 0  # the PPO clip binds too
    # the weights matter: without them the loss differs
    assert grpo.grpo_loss(logp, old, ref, adv, mask, loss_type=loss_type, num_tokens=float(mask.sum()),
                          **kw)[0].item() != pytest.approx(want.item(), rel=1e-3)


def test_weights_are_detached_and_do_not_weight_the_kl():
    """A weight tensor that requires grad gets no gradient; with A = 0 (surrogate 0) only the KL is
    left, and it is the same whatever the weights."""
    logp, old, sampler, ref, _, mask = mismatched_batch(1)
    w = grpo.mismatch_weights(old, sampler, mask, "token", CAP)[0].clone().requires_grad_()
    zero = torch.zeros(logp.shape[0])
    x = logp.clone().requires_grad_()
    loss, _ = grpo.grpo_loss(x, old, ref, zero, mask, eps_low=0.2, eps_high=0.28, beta=0.04, is_weights=w)
    loss.backward()
    assert w.grad is None
    plain, _ = grpo.grpo_loss(logp, old, ref, zero, mask, eps_low=0.2, eps_high=0.28, beta=0.04)
    assert loss.item() == plain.item() != 0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_no_weights_is_exactly_the_old_loss(loss_type):
    """is_weights=None runs the old code: the same loss and gradient bit for bit as not passing it,
    and as unit weights (x * 1.0 is exact)."""
    logp, old, _, ref, adv, mask = mismatched_batch(2)
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.04, loss_type=loss_type, max_new_tokens=9)
    results = []
    for extra in ({}, {"is_weights": None}, {"is_weights": torch.ones_like(logp)}):
        x = logp.clone().requires_grad_()
        loss, stats = grpo.grpo_loss(x, old, ref, adv, mask, **kw, **extra)
        loss.backward()
        results.append((loss.detach(), x.grad, stats))
    for loss, grad, stats in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1]) and stats == results[0][2]


# ---------------------------------------------------------------------------------------------
# One train_grpo step: a bf16 sampler against the fp32 trainer
# ---------------------------------------------------------------------------------------------

QUESTIONS = ["What is 3 plus 4?", "Please see a doctor about the swelling in your ankle, the report says so.", "Hi"]


class Prompts:
    def batch(self, step, n, rank=0, world=1):
        return [{"prompt": [{"role": "user", "content": QUESTIONS[(step + i) % 3]}]} for i in range(n)]


def e_rewarder(rec, texts, finished):
    return [{"score": t.count("e") / max(len(t), 1)} for t in texts]


@pytest.fixture(scope="module")
def loaded_policy(tiny_model_dir):
    return policy.load_policy(tiny_model_dir, device="cpu")


def one_step(loaded_policy, tmp_path, **kw):
    model, tok = loaded_policy
    cfg = grpo.GRPOConfig(steps=1, prompts_per_step=4, group_size=4, max_new_tokens=12, lr=1e-3, micro_batch_size=6,
                          checkpoint_every=0, log_every=0, seed=3, **kw)
    name = "-".join(f"{k}={v}" for k, v in kw.items())
    return grpo.train_grpo(copy.deepcopy(model), tok, Prompts(), e_rewarder, cfg, str(tmp_path / name))[-1]


def test_bf16_sampler_shows_a_mismatch_kl_fp32_does_not(loaded_policy, tmp_path):
    """Measured on a 2-core AMD EPYC CPU, torch 2.13.0, 2026-11-29 (this fixture's 2-layer random-init
    Llama, 16 completions of 12 tokens): mismatch/kl 4.5e-14 with the fp32 sampler (float rounding:
    sampler and trainer are different kernels), 1.3e-7 with the bf16 one; logp_gap 1.9e-7 vs 4.0e-4.
    The bounds: fp32 < 1e-10 (2000x margin), bf16 > 1e-8 (13x margin) and > 1000x fp32. A random
    init's logits are small, so bf16 rounds them little; a trained model's drift is larger."""
    fp32 = one_step(loaded_policy, tmp_path, sampler_dtype="float32")
    bf16 = one_step(loaded_policy, tmp_path, sampler_dtype="bfloat16")
    auto = one_step(loaded_policy, tmp_path)  # on CPU "auto" is the weights' fp32
    assert 0 <= fp32["mismatch/kl"] < 1e-10
    assert bf16["mismatch/kl"] > 1e-8 and bf16["mismatch/kl"] > 1e3 * fp32["mismatch/kl"]
    assert auto["mismatch/kl"] == fp32["mismatch/kl"]
    assert bf16["logp_gap"] > 1e-5 > fp32["logp_gap"]
    for h in (fp32, bf16):  # logged with the correction off; a tiny gap never reaches the cap
        assert h["mismatch/trunc_frac"] == 0.0


def test_correction_changes_the_update_only_when_on(loaded_policy, tmp_path):
    """Same bf16 rollout (same seed): tis off and on log the same mismatch statistics; the
    correction moves the loss; a cap below every weight truncates all of them."""
    off = one_step(loaded_policy, tmp_path, sampler_dtype="bfloat16")
    for level in ("token", "sequence"):
        on = one_step(loaded_policy, tmp_path, sampler_dtype="bfloat16", tis=level)
        assert on["mismatch/kl"] == off["mismatch/kl"] and on["reward/mean"] == off["reward/mean"]
        assert on["loss"] != off["loss"]
        tight = one_step(loaded_policy, tmp_path, sampler_dtype="bfloat16", tis=level, tis_cap=1e-3)
        assert tight["mismatch/trunc_frac"] == 1.0


def test_config_is_checked(loaded_policy, tmp_path):
    with pytest.raises(UserError, match="tis must be one of"):
        one_step(loaded_policy, tmp_path, tis="tok")
    with pytest.raises(UserError, match="sampler_dtype"):
        one_step(loaded_policy, tmp_path, sampler_dtype="fp8")
