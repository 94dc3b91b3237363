"""grpo.py - GRPO, by hand: group advantages, the clipped loss with a KL penalty, the training loop.

    history = train_grpo(policy, tokenizer, sampler, rewarder, GRPOConfig(steps=100), out_dir)

What it does, top to bottom:
  1. The math, as pure functions the tests check against float64 references: `group_advantages`,
     `k3_kl`, `mismatch_weights`, `grpo_loss`.
  2. The loop `train_grpo`.
  3. What the loop calls for DDP / FSDP2 and for checkpoints that resume bit-exactly.
The model, its sampler (`policy.generate`) and the trainer's log-probs (`policy.completion_logprobs`)
live in policy.py; the rewards in reward.py; the RL prompts come from data.MixedSampler.

The GRPO algorithm, one step (`train_grpo`):
  1. B prompts from the sampler (this rank's contiguous share of whole groups; `sampler.batch`).
  2. G completions per prompt at temperature T; the sampler keeps each token's log-prob.
  3. One reward per completion (`rewarder(record, texts, finished)`, one group at a time).
  4. Advantage A_i = r_i - mean(r_group)  (optionally / (std(r_group) + eps)).
     GRPO (Shao et al. 2024, DeepSeekMath) divides by the std; Dr. GRPO (Liu et al. 2025,
     "Understanding R1-Zero-Like Training") shows that biases updates towards too-easy and too-hard
     prompts, so the default is `scale_rewards=False`.
  5. For `num_iterations` passes over the batch (micro-batched, one optimizer step per pass):
       ratio_t = exp(logp_t - old_logp_t)       old = the policy that sampled (pass 0: ratio == 1)
       surr_t  = min(ratio_t A, clip(ratio_t, 1 - eps_low, 1 + eps_high) A)
       kl_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1     (k3, Schulman 2020 "Approximating KL
                 divergence"; unbiased, always >= 0; the log-ratio is clamped to [-20, 20] first)
       loss    = aggregate(-(surr_t - beta kl_t)) over completion tokens (stop token included):
         dapo    (default) sum over every completion token of the step / their count, the count
                 all-reduced over micro-batches and ranks (DAPO, Yu et al. 2025: token-level loss,
                 so long answers are not down-weighted)
         grpo    mean over each sequence's tokens, then mean over sequences (the original GRPO)
         dr_grpo sum over tokens / (num_sequences * max_new_tokens) (Dr. GRPO: a constant
                 normaliser, no length bias)
     eps_low 0.2 / eps_high 0.28 is DAPO's clip-higher (room for low-probability tokens to grow);
     beta 0.04 is DeepSeekMath's KL coefficient. The reference is a frozen copy of the initial
     policy (no grad, not in the optimizer). KL is computed and logged even when beta = 0.
     Sampler/trainer mismatch (`mismatch_weights`, `tis`): old_logp is recomputed by the trainer, so
     the ratio does not see that the sampler (bf16, compiled, other kernels) is a slightly different
     policy than the one being trained: the update is off-policy by that gap. Truncated importance
     sampling (TIS; Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL
     Training") reweights each token's surrogate by the detached
       w_t = min(exp(old_logp_t - sampler_logp_t), tis_cap)            tis = "token"
     or by one weight per sequence, the product of its token ratios truncated likewise,
       w_i = min(exp(sum_t (old_logp_it - sampler_logp_it)), tis_cap)  tis = "sequence"
     (the exact sequence likelihood ratio; GSPO, Zheng et al. 2025, argues for sequence-level ratios
     with a length-normalised one, and later mismatch work has sequence-level and masked-IS (MIS)
     variants of TIS); the KL term is not reweighted. Off by default; its statistics are
     logged every step either way. `sampler_dtype` forces the sampler's precision (bf16 on a CPU
     shows the mismatch without a GPU).
  6. Log one dense line (rank 0), checkpoint every `checkpoint_every` steps (rank 0).

Metrics (one dict per step, returned by `train_grpo`, averaged over all ranks):
  step, lr, loss
  reward/mean             mean final reward;  reward/<name>: mean of each numeric component the
                          rewarder returns (e.g. reward/rubric, reward/unterminated)
  adv/std                 std of the advantages (0 => no learning signal this step)
  groups/zero_var_frac    fraction of groups whose G rewards are all equal (zero advantage)
  kl                      k3 KL to the reference, mean per completion token
  clip_frac               fraction of tokens where the clip binds; clip_frac/low, clip_frac/high
  entropy                 mean per-token entropy of the policy at temperature T
  len/mean                mean completion length in tokens (stop token included)
  len/truncated_frac      fraction of completions that hit max_new_tokens without a stop token
  len/prompt              mean prompt length in tokens (the FLOPs of run.py's compute table)
  logp_gap                mean |sampler logp - trainer logp| (should be ~0 in fp32; large => bug
                          or bf16 drift between the decode path and the training forward)
  mismatch/kl             k3 estimate of KL(sampler || trainer) per completion token, r - 1 - log r
                          with r = exp(trainer old logp - sampler logp) (unbiased on the sampler's
                          tokens and >= 0 term by term, unlike the k1 mean(sampler - trainer);
                          `mismatch_weights`); ~0 with an fp32 sampler, > 0 under bf16
  mismatch/trunc_frac     fraction of importance weights above tis_cap: tokens (tis off or token),
                          sequences (tis sequence)
  perf/rollout_tok_s      sampled tokens per second (this rank)
  perf/rollout_s, perf/reward_s, perf/train_s, perf/step_s
                          wall time of the sampling, the rewards (the judge), the update (the
                          reference's forward included, also alone as perf/ref_s) and the step

Distributed: torchrun sets RANK/LOCAL_RANK/WORLD_SIZE. Each rank samples its share of whole groups,
the DAPO token count is all-reduced, the loss is scaled by world_size (DDP averages gradients),
micro-steps before the last run under `no_sync`, every rank runs the same collectives, rank 0 prints
and checkpoints. One step on N ranks equals one step on one rank with the same global batch.
`fsdp=True` (for a model whose weights, grads and AdamW state do not fit on one GPU) shards policy
and reference with FSDP2 instead of DDP: each decoder block and the root is an all-gather unit,
gradients are reduce-scattered (averaged, like DDP) every micro-batch, the rollout gathers the full
weights for the sampler and frees them after, a checkpoint gathers the full model and optimizer
state to rank 0. `gradient_checkpointing=True` recomputes each block's activations in the backward
(~30% more compute) when long completions do not fit; the two combine.

Checkpoints (`out_dir/checkpoint/`): the model via `save_pretrained` (safetensors) + tokenizer, and
`trainer_state.pt` with optimizer, LR schedule, step (= the sampler position: samplers are
deterministic in the step), history and the python/numpy/torch RNG states. The sampling noise is
a function of (seed, step), so it needs no saved state. Resume continues bit-exactly on CPU.

Commands:
  python grpo.py                                    # demo: tiny model, SFT, a few GRPO steps (CPU)
  python run.py ...                                 # the experiment (one GPU: same command)
  torchrun --standalone --nproc_per_node=N run.py ... # DDP, N processes (GPUs or CPU/gloo)
  torchrun --standalone --nproc_per_node=N run.py ... --grpo-fsdp true --grpo-gradient-checkpointing true
  python bench.py --device cpu                      # throughput
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist

from data import UserError, encode_prompt
from policy import all_reduce_sum, autocast, completion_logprobs, decode_completions, generate, rank_and_world_size
from sft import fmt_duration, lr_factor

# ----------------------------------------------------------------------------------------------
# 1. The GRPO math
# ----------------------------------------------------------------------------------------------

LOSS_TYPES = ("dapo", "grpo", "dr_grpo")
TIS_LEVELS = ("off", "token", "sequence")  # sampler/trainer mismatch correction (`mismatch_weights`)


def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = False,
                     eps: float = 1e-4) -> torch.Tensor:
    """A_i = r_i - mean of its group (rows i*G..i*G+G-1), optionally / (std of the group + eps)."""
    r = rewards.view(-1, group_size)
    adv = r - r.mean(1, keepdim=True)
    if scale_by_std:
        adv = adv / (r.std(1, keepdim=True) + eps)
    return adv.flatten()


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || ref): exp(d) - d - 1 with d = ref - logp, d clamped to
    [-20, 20] so exp cannot overflow when the two drift far apart."""
    d = (ref_logp - logp).clamp(-20.0, 20.0)
    return torch.exp(d) - d - 1


def mismatch_weights(old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, level: str = "off",
                     cap: float = 2.0) -> tuple[torch.Tensor | None, dict]:
    """Truncated importance weights that correct the sampler/trainer mismatch (module docstring,
    step 5), and its statistics. old_logp: the trainer's log-probs of the sampled tokens under the
    policy that sampled them; sampler_logp: the sampler's own (Rollout.logps); mask: (N, T) 1.0 on
    completion tokens. Everything here is detached.

      token     w_t = min(exp(old_t - sampler_t), cap), one weight per token
      sequence  w_i = min(exp(sum_t mask_it (old_it - sampler_it)), cap), one per row, broadcast
      off       no weights (None); the statistics are still computed (at token level)

    Returns (weights (N, T) or None, stats) with stats floats:
      mismatch/kl          k3 estimate of KL(sampler || trainer), mean per completion token:
                           r - 1 - log r with r = exp(old - sampler) (`k3_kl`, clamped). The tokens
                           are drawn from the sampler, so E[r] = 1 and this is unbiased for the KL,
                           like the k1 estimate mean(sampler - old); k3 is chosen because every term
                           is >= 0 (k1's terms have either sign and cancel: a step's mean can be
                           negative or ~0 while the two disagree token by token) and its variance
                           is lower when the two are close (Schulman 2020).
      mismatch/trunc_frac  fraction of weights the cap truncates (w > cap): of tokens at token level
                           and when off, of sequences (rows with >= 1 completion token) at sequence level
    Pads never matter: their log-ratio is masked to 0 (weight 1) before anything is computed."""
    if level not in TIS_LEVELS:
        raise UserError(f"tis must be one of {TIS_LEVELS}, got {level!r}")
    with torch.no_grad():
        mask = mask.to(old_logp.dtype)
        log_w = (old_logp - sampler_logp) * mask
        n_tok = mask.sum().clamp(min=1)
        # in float64: in float32 exp(d) - d - 1 rounds to ~1e-7 noise, the size of a bf16 sampler's KL
        kl = float((k3_kl(sampler_logp.double(), old_logp.double()) * mask).sum() / n_tok)
        if level == "sequence":
            seq = torch.exp(log_w.sum(1, keepdim=True))  # inf when it overflows: min(inf, cap) == cap
            rows = mask.sum(1, keepdim=True) > 0
            trunc = float(((seq > cap) & rows).sum() / rows.sum().clamp(min=1))
            weights = seq.clamp(max=cap).expand_as(mask)
        else:
            w = torch.exp(log_w)
            trunc = float(((w > cap).to(mask.dtype) * mask).sum() / n_tok)
            weights = w.clamp(max=cap) if level == "token" else None
    return weights, {"mismatch/kl": kl, "mismatch/trunc_frac": trunc}


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, *, eps_low: float, eps_high: float, beta: float, loss_type: str = "dapo",
              max_new_tokens: int | None = None, num_tokens: float | None = None,
              is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped-surrogate GRPO loss with a k3 KL penalty (module docstring, step 5). Shapes: (N, T)
    except advantages (N,). is_weights: optional (N, T) importance weights (`mismatch_weights`) that
    multiply each token's surrogate term, detached; the KL term is not weighted. Returns (loss,
    stats) with stats floats: kl, clip_frac, clip_frac/low, clip_frac/high (token means over `mask`)."""
    if loss_type not in LOSS_TYPES:
        raise UserError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    if is_weights is not None:  # truncated importance sampling: the sampler's tokens, the trainer's policy
        surrogate = surrogate * is_weights.detach()
    kl = k3_kl(logp, ref_logp)
    per_token = -surrogate + beta * kl if beta else -surrogate
    mask = mask.to(per_token.dtype)
    if loss_type == "dapo":
        denom = mask.sum().clamp(min=1) if num_tokens is None else max(float(num_tokens), 1.0)
        loss = (per_token * mask).sum() / denom
    elif loss_type == "grpo":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    else:
        if max_new_tokens is None:
            raise ValueError("dr_grpo needs max_new_tokens (its constant normaliser)")
        loss = (per_token * mask).sum() / (mask.shape[0] * max_new_tokens)
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        low = ((ratio < 1 - eps_low) & (adv < 0)).to(mask.dtype) * mask  # where the clip binds
        high = ((ratio > 1 + eps_high) & (adv > 0)).to(mask.dtype) * mask
        stats = {"kl": float((kl * mask).sum() / n), "clip_frac": float((low + high).sum() / n),
                 "clip_frac/low": float(low.sum() / n), "clip_frac/high": float(high.sum() / n)}
    return loss, stats


# ----------------------------------------------------------------------------------------------
# 2. The GRPO loop
# ----------------------------------------------------------------------------------------------


@dataclass
class GRPOConfig:
    steps: int = 100               # GRPO steps (one generation batch each)
    prompts_per_step: int = 8      # B: prompts per step, global (split over ranks by whole groups)
    group_size: int = 8            # G: completions per prompt
    max_new_tokens: int = 64       # completion budget (also dr_grpo's constant normaliser)
    temperature: float = 1.0       # sampling temperature; the trainer divides logits by it too
    lr: float = 1e-5               # peak AdamW LR (real models; the tiny model's preset raises it)
    weight_decay: float = 0.0      # AdamW weight decay (RL updates are small; no decay by default)
    betas: tuple[float, float] = (0.9, 0.99)  # AdamW betas
    warmup: int = 0                # linear LR warmup (optimizer steps), then constant
    beta: float = 0.04             # KL coefficient (DeepSeekMath); 0 drops the term, KL still logged
    eps_low: float = 0.2           # lower clip: ratio >= 1 - eps_low (PPO/GRPO)
    eps_high: float = 0.28         # upper clip: ratio <= 1 + eps_high (DAPO clip-higher)
    loss_type: str = "dapo"        # "dapo" | "grpo" | "dr_grpo" (module docstring, step 5)
    scale_rewards: bool = False    # divide advantages by the group std (GRPO) or not (Dr. GRPO)
    num_iterations: int = 1        # optimizer passes per generation batch (GRPO's mu); >1 => real ratios
    micro_batch_size: int = 16     # completions per forward/backward (gradient accumulation inside a step)
    grad_clip: float = 1.0         # max global grad norm (0 = off)
    checkpoint_every: int = 50     # save every this many steps (0 = only at the end)
    log_every: int = 1             # one progress line per this many steps (rank 0)
    seed: int = 0                  # python/numpy/torch seeds and the per-step sampling noise
    compile: bool = False          # torch.compile the decode step (GPU; CUDA graphs over a static cache)
    lean_sampler: bool = True      # the functional decoder for Llama-family weights (False: HF forward)
    gradient_checkpointing: bool = False  # recompute activations in the backward (~30% more compute): long completions
    fsdp: bool = False             # torchrun: FSDP2-shard policy, reference, AdamW state; models too big to replicate
    tis: str = "off"               # sampler/trainer mismatch correction: "off" | "token" | "sequence" (truncated IS)
    tis_cap: float = 2.0           # truncation cap C of the importance weights: min(w, C)
    sampler_dtype: str = "auto"    # sampler compute dtype: "auto" (bf16 under GPU autocast) | "bfloat16" | "float32"


def _step_noise(seed: int, step: int, rows: int, max_new_tokens: int) -> torch.Tensor:
    """Uniforms for every global row of a step: a function of (seed, step) only, so the samples do not
    depend on the number of ranks and need no saved generator state to resume."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.rand((rows, max_new_tokens), generator=g)


def _numeric(d: dict) -> dict:
    """The numeric, applicable reward components (a rewarder marks a component that does not apply to
    this record - e.g. `task` on a rubric record - as NaN, so each mean is over the right responses)."""
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and v == v}


def step_tokens(metrics: dict, cfg: GRPOConfig) -> float:
    """Completion tokens sampled in one step, global (every one of them is also trained on)."""
    return metrics["len/mean"] * cfg.prompts_per_step * cfg.group_size


def steps_done(history: list[dict], cfg: GRPOConfig, token_budget: int | None) -> bool:
    """Without a budget: cfg.steps steps. With one: stop once the sampled tokens are within half a
    step of it (the next step would overshoot by more than stopping undershoots), or at 3x cfg.steps."""
    if token_budget is None:
        return len(history) >= cfg.steps
    if not history:
        return False
    total = sum(step_tokens(h, cfg) for h in history)
    return total + step_tokens(history[-1], cfg) / 2 >= token_budget or len(history) >= 3 * cfg.steps


def train_grpo(policy, tokenizer, sampler, rewarder, cfg: GRPOConfig, out_dir: str, resume: bool = False,
               ref_model=None, log=print, token_budget: int | None = None, reward_transform=None) -> list[dict]:
    """Train `policy` in place with GRPO; returns the per-step metrics (module docstring).

    policy: the INITIAL policy (on its device). The frozen reference is a copy of it (or `ref_model`);
      with resume=True the policy's weights, optimizer, schedule, history and RNG states are then
      replaced by those in out_dir/checkpoint. Under torchrun call init_distributed() first; the
      policy is wrapped in DDP here, or with cfg.fsdp sharded in place (it stays sharded: save it
      with `save_policy` on every rank). The checkpoint directory must be visible to every rank.
    sampler: .batch(step, n_prompts, rank, world_size) -> this rank's contiguous share of the step's
      records (each with "prompt" messages); must be deterministic in step.
    rewarder: (record, texts, finished) -> one dict per text with "score" + numeric components.
    token_budget: run until this many completion tokens are sampled (steps_done) instead of cfg.steps
      steps: compute matching by tokens (run.py).
    reward_transform: (records, outs, step) -> outs, applied to this rank's rewards of the step
      before the advantages (run.py's placebo arm permutes the trait rewards); deterministic in step.
    """
    rank, world = rank_and_world_size()
    if cfg.prompts_per_step % world:
        raise UserError(f"prompts_per_step ({cfg.prompts_per_step}) must be divisible by the {world} ranks")
    if cfg.loss_type not in LOSS_TYPES:
        raise UserError(f"loss_type must be one of {LOSS_TYPES}, got {cfg.loss_type!r}")
    if cfg.tis not in TIS_LEVELS:
        raise UserError(f"tis must be one of {TIS_LEVELS}, got {cfg.tis!r}")
    if cfg.sampler_dtype not in ("auto", "bfloat16", "float32"):
        raise UserError(f"sampler_dtype must be auto, bfloat16 or float32, got {cfg.sampler_dtype!r}")
    sampler_dtype = None if cfg.sampler_dtype == "auto" else getattr(torch, cfg.sampler_dtype)
    device = next(policy.parameters()).device
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    ref = ref_model if ref_model is not None else copy.deepcopy(policy)
    ref.eval().requires_grad_(False)
    policy.eval()  # no dropout: the sampler, the old policy and the trainer must be the same function
    fsdp = cfg.fsdp and world > 1
    state = _load_checkpoint(out_dir, policy, fsdp) if resume else None
    checkpointed = _checkpointed(policy) if cfg.gradient_checkpointing else []
    model = policy
    if fsdp:  # the frozen reference too: a full replica of it per rank is what FSDP is there to avoid
        _fully_shard(policy)
        _fully_shard(ref)
    elif world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(policy, device_ids=[device.index] if device.type == "cuda" else None)
    # after sharding: the optimizer holds each rank's shards
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.warmup, 0, "constant", 1.0))
    start, history = 0, []
    if state is not None:
        _load_optimizer(policy, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start, history = state["step"], state["history"]
    G, T = cfg.group_size, cfg.max_new_tokens
    local_prompts = cfg.prompts_per_step // world
    t_run = time.perf_counter()
    for step in itertools.count(start):
        if steps_done(history, cfg, token_budget):
            break
        t0 = time.perf_counter()
        # 1-2. prompts and rollouts
        records = sampler.batch(step, cfg.prompts_per_step, rank, world)
        if len(records) != local_prompts:
            raise ValueError(f"sampler gave {len(records)} prompts, expected {local_prompts} on each rank")
        prompts = [encode_prompt(tokenizer, rec["prompt"]) for rec in records]
        rows = slice(rank * local_prompts * G, (rank + 1) * local_prompts * G)
        noise = _step_noise(cfg.seed, step, cfg.prompts_per_step * G, T)[rows]
        with _full_weights(policy):
            ro = generate(policy, tokenizer, prompts, G, T, cfg.temperature, noise=noise,
                          lean=None if cfg.lean_sampler else False, compile=cfg.compile, dtype=sampler_dtype)
        t_rollout = time.perf_counter() - t0
        n_rows, width = ro.completion.shape
        # 3. rewards, one group at a time
        texts = decode_completions(tokenizer, ro)
        finished = ro.finished.tolist()
        outs = []
        for g, rec in enumerate(records):
            outs += rewarder(rec, texts[g * G:(g + 1) * G], finished[g * G:(g + 1) * G])
        if reward_transform is not None:
            outs = reward_transform(records, outs, step)
        t_reward = time.perf_counter() - t0 - t_rollout
        rewards = torch.tensor([o["score"] for o in outs], dtype=torch.float32, device=device)
        # 4. advantages
        adv = group_advantages(rewards, G, cfg.scale_rewards)
        # 5. the update
        t1 = time.perf_counter()
        input_ids, attention, positions = ro.inputs()
        num_tokens = float(all_reduce_sum(ro.mask.sum().detach().clone()))
        micro = [slice(i, min(i + cfg.micro_batch_size, n_rows)) for i in range(0, n_rows, cfg.micro_batch_size)]
        old, refs, weights = [None] * len(micro), [None] * len(micro), [None] * len(micro)
        t_ref = 0.0  # the reference's forward, inside the update's time
        sums = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "clip_frac/low": 0.0, "clip_frac/high": 0.0,
                "entropy": 0.0, "logp_gap": 0.0, "mismatch/kl": 0.0}
        trunc = [0.0, 0.0]  # truncated weights, weights (tokens, or sequences at tis="sequence")
        for it in range(cfg.num_iterations):
            for j, mb in enumerate(micro):
                # FSDP reduce-scatters every micro-batch: skipping it (set_requires_gradient_sync) would
                # keep a full, unsharded gradient on every rank until the last one
                sync = j == len(micro) - 1 or world == 1 or fsdp
                with (contextlib.nullcontext() if sync else model.no_sync()), autocast(device), _recompute(checkpointed):
                    logp, entropy = completion_logprobs(model, input_ids[mb], attention[mb], positions[mb], width,
                                                        cfg.temperature, with_entropy=it == 0)
                    mask = ro.mask[mb]
                    if it == 0:  # the batch's old and reference log-probs, kept for later passes
                        old[j] = logp.detach()
                        t_r = time.perf_counter()
                        with torch.no_grad():
                            refs[j] = completion_logprobs(ref, input_ids[mb], attention[mb], positions[mb], width,
                                                          cfg.temperature)[0]
                        t_ref += time.perf_counter() - t_r
                        sums["entropy"] += float((entropy * mask).sum())
                        sums["logp_gap"] += float(((logp.detach() - ro.logps[mb]).abs() * mask).sum())
                        weights[j], mm = mismatch_weights(old[j], ro.logps[mb], mask, cfg.tis, cfg.tis_cap)
                        sums["mismatch/kl"] += mm["mismatch/kl"] * float(mask.sum())
                        units = float((mask.sum(1) > 0).sum()) if cfg.tis == "sequence" else float(mask.sum())
                        trunc[0], trunc[1] = trunc[0] + mm["mismatch/trunc_frac"] * units, trunc[1] + units
                    loss, stats = grpo_loss(logp, old[j], refs[j], adv[mb], mask, eps_low=cfg.eps_low,
                                            eps_high=cfg.eps_high, beta=cfg.beta, loss_type=cfg.loss_type,
                                            max_new_tokens=T, num_tokens=num_tokens, is_weights=weights[j])
                    # dapo is already normalised by the global token count; grpo/dr_grpo by the
                    # micro-batch's rows -> reweight to the global batch. x world: DDP and FSDP average grads.
                    scale = world if cfg.loss_type == "dapo" else (mb.stop - mb.start) / n_rows
                    (loss * scale).backward()
                if it == cfg.num_iterations - 1:  # report the last pass
                    ntok = float(mask.sum())
                    for k in ("kl", "clip_frac", "clip_frac/low", "clip_frac/high"):
                        sums[k] += stats[k] * ntok
                    sums["loss"] += loss.item() * scale / world
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        t_train = time.perf_counter() - t1
        # 6. metrics: every rank contributes (sum, count) pairs; every rank runs the same collective
        zero_var = rewards.view(-1, G).std(1) == 0
        n_tok = float(ro.mask.sum())  # token stats are means over this step's completion tokens
        local: dict[str, list[float]] = {k: [v, n_tok] for k, v in sums.items() if k != "loss"}
        local.update({"loss": [sums["loss"], 1.0], "reward/mean": [float(rewards.sum()), n_rows],
                      "mismatch/trunc_frac": trunc,
                      "adv/sq": [float((adv ** 2).sum()), n_rows],
                      "groups/zero_var_frac": [float(zero_var.sum()), zero_var.numel()],
                      "len/mean": [n_tok, n_rows], "len/truncated_frac": [float((~ro.finished).sum()), n_rows],
                      "len/prompt": [float(sum(len(p) for p in prompts)), len(prompts)]})
        for o in outs:
            for k, v in _numeric(o).items():
                if k != "score":
                    s = local.setdefault(f"reward/{k}", [0.0, 0])
                    s[0], s[1] = s[0] + v, s[1] + 1
        gathered = [local]
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, local)
        merged: dict[str, list[float]] = {}
        for part in gathered:
            for k, (s, c) in part.items():
                m = merged.setdefault(k, [0.0, 0.0])
                m[0], m[1] = m[0] + s, m[1] + c
        metrics = {k: s / max(c, 1e-12) for k, (s, c) in merged.items()}
        metrics["loss"] = merged["loss"][0]  # each rank holds its share of the global loss
        metrics["adv/std"] = math.sqrt(metrics.pop("adv/sq"))  # advantages have zero mean per group
        metrics.update({"step": step + 1, "lr": scheduler.get_last_lr()[0],
                        "perf/rollout_tok_s": n_tok / t_rollout, "perf/rollout_s": t_rollout,
                        "perf/reward_s": t_reward, "perf/ref_s": t_ref, "perf/train_s": t_train,
                        "perf/step_s": time.perf_counter() - t0})
        history.append(metrics)
        # 7. log (rank 0) and checkpoint (rank 0 writes), then every rank waits so none reads a half-written file
        if rank == 0 and cfg.log_every and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
            eta = (time.perf_counter() - t_run) / (step + 1 - start) * max(cfg.steps - step - 1, 0)
            log(f"grpo {step + 1}/{cfg.steps} | reward {metrics['reward/mean']:.3f} | kl {metrics['kl']:.4f}"
                f" | clip {metrics['clip_frac']:.3f} | ent {metrics['entropy']:.2f} | len {metrics['len/mean']:.1f}"
                f" | sampler kl {metrics['mismatch/kl']:.1e}"
                f" | {metrics['perf/rollout_tok_s']:,.0f} tok/s | {metrics['perf/step_s']:.2f} s/step"
                f" | ETA {fmt_duration(eta)}")
        if (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0) or steps_done(history, cfg, token_budget):
            save_checkpoint(out_dir, policy, tokenizer, optimizer, scheduler, step + 1, history, cfg)
            if world > 1:
                dist.barrier()
    return history


# ----------------------------------------------------------------------------------------------
# 3. Distributed training, checkpoints and exact resume (what train_grpo calls)
# ----------------------------------------------------------------------------------------------

CKPT = "checkpoint"


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsdp_units(model) -> list:
    """The modules `fully_shard` sharded (none for a plain or DDP model)."""
    if rank_and_world_size()[1] == 1:
        return []
    import torch.distributed.fsdp as fsdp

    return [m for m in model.modules() if isinstance(m, getattr(fsdp, "FSDPModule", ()))]  # () before torch 2.6


def _fully_shard(model) -> None:
    """FSDP2: one all-gather unit per decoder block, then the root (embeddings, final norm, head).
    Every unit reshards after its forward, the root too: the reference never runs the backward in
    which FSDP would otherwise reshard the root."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise UserError(f"fsdp needs torch >= 2.6 (FSDP2's fully_shard); this is torch {torch.__version__}") from None
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise UserError(f"fsdp shards the decoder blocks in model.model.layers; {type(model).__name__} has none")
    for layer in layers:
        fully_shard(layer, reshard_after_forward=True)
    fully_shard(model, reshard_after_forward=True)


@contextlib.contextmanager
def _full_weights(model):
    """FSDP: every unit's full weights for the length of the block. After unshard() each module's
    .weight is again a plain, full nn.Parameter, which is what the lean sampler reads. Forwards keep
    them gathered (reshard_after_forward off): the HF fallback decoder runs the model once per token,
    ranks stop decoding at different steps, so no forward may all-gather. A no-op without FSDP."""
    units = _fsdp_units(model)
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


def _full_state(policy, optimizer=None) -> tuple[dict | None, dict | None]:
    """(model state, optimizer state) to save. FSDP: gathered from every rank (a collective: call it
    on all of them) to CPU, full tensors on rank 0, the optimizer's keyed by parameter name.
    Otherwise (None: save_pretrained reads the model itself, optimizer.state_dict())."""
    if not _fsdp_units(policy):
        return None, None if optimizer is None else optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(policy, options=opts),
            None if optimizer is None else get_optimizer_state_dict(policy, optimizer, options=opts))


def save_policy(policy, tokenizer, path: str, state_dict: dict | None = None) -> None:
    """save_pretrained (safetensors) + the tokenizer, written by rank 0. Call it on every rank: an FSDP
    policy's full weights are gathered from all of them first (or pass them as `state_dict`)."""
    if state_dict is None:
        state_dict = _full_state(policy)[0]
    if rank_and_world_size()[0] == 0:
        policy.save_pretrained(path, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(path)


def save_checkpoint(out_dir: str, policy, tokenizer, optimizer, scheduler, step: int, history: list[dict],
                    cfg: GRPOConfig) -> None:
    """Call it on every rank (FSDP gathers the full state from all of them); rank 0 writes to a
    temporary directory, then swaps it in: a kill mid-save never loses the last one."""
    weights, optim = _full_state(policy, optimizer)
    if rank_and_world_size()[0] != 0:
        return
    final, tmp = os.path.join(out_dir, CKPT), os.path.join(out_dir, CKPT + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_policy(policy, tokenizer, tmp, weights)
    torch.save({"step": step, "optimizer": optim, "scheduler": scheduler.state_dict(), "history": history,
                "rng": _rng_state(), "config": asdict(cfg), "fsdp": weights is not None},
               os.path.join(tmp, "trainer_state.pt"))
    old = final + ".old"  # the previous checkpoint stays on disk until the new one is in place
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(out_dir: str, policy, fsdp: bool) -> dict:
    """Load the saved weights into the (not yet sharded) policy; return the trainer state, whose
    optimizer state `_load_optimizer` restores once the optimizer exists."""
    path = os.path.join(out_dir, CKPT)
    if not os.path.isfile(os.path.join(path, "trainer_state.pt")):  # killed between the two renames
        path = os.path.join(out_dir, CKPT + ".old")
    if not os.path.isfile(os.path.join(path, "trainer_state.pt")):
        raise UserError(f"{os.path.join(out_dir, CKPT)}: no checkpoint to resume from")
    state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    if state.get("fsdp", False) != fsdp:  # the two keep the optimizer state in different layouts
        raise UserError(f"{path} was saved {'with' if state.get('fsdp') else 'without'} FSDP: resume it the same way"
                        " (--grpo-fsdp under torchrun)")
    saved = type(policy).from_pretrained(path, dtype=next(policy.parameters()).dtype)
    policy.load_state_dict(saved.state_dict())
    return state


def _load_optimizer(policy, optimizer, saved: dict) -> None:
    if _fsdp_units(policy):  # full tensors by parameter name; each rank keeps its shard
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(policy, optimizer, saved, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(saved)


def _checkpointed(policy) -> list:
    """Turn on HF gradient checkpointing (each decoder block's activations are recomputed in the
    backward instead of kept); returns the modules whose training mode decides it (`_recompute`)."""
    # transformers 5 renamed it (the old name warns); the first argument is the checkpoint's kwargs in both
    enable = getattr(policy, "activation_checkpointing_enable", None) or policy.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    return [m for m in policy.modules() if getattr(m, "gradient_checkpointing", False) is True]


@contextlib.contextmanager
def _recompute(modules: list):
    """HF checkpoints only while those modules are in training mode, and policy.train() would turn on
    dropout too (the sampler, the old policy and the trainer must be one function): so flip
    `training` on them alone, for the update only (with it on, older transformers also drop the KV
    cache the HF fallback sampler asks for)."""
    for m in modules:
        m.training = True
    try:
        yield
    finally:
        for m in modules:
            m.training = False


# ----------------------------------------------------------------------------------------------
# Demo
# ----------------------------------------------------------------------------------------------

if __name__ == "__main__":
    import tempfile

    from data import build_tokenizer
    from policy import ModelConfig, init_tiny_model
    from sft import SFTConfig, sft

    # A toy world: the model learns to answer "7" and GRPO rewards answers that contain a 7.
    convs = [[{"role": "user", "content": f"What is {a} plus {b}?"},
              {"role": "assistant", "content": f"The answer is {a + b}."}] for a in range(10) for b in range(10)]
    tok = build_tokenizer([m["content"] for c in convs for m in c], vocab_size=300)
    torch.manual_seed(0)
    policy = init_tiny_model(tok, ModelConfig(hidden=64, layers=2, heads=2, kv_heads=2, intermediate=256))
    sft(policy, tok, convs, SFTConfig(steps=200, batch_size=16, log_every=50))

    class ToySampler:
        def batch(self, step, n, rank=0, world=1):
            rng = random.Random(step)
            recs = [{"prompt": [{"role": "user", "content": f"What is {rng.randrange(10)} plus {rng.randrange(10)}?"}]}
                    for _ in range(n)]
            k = n // world
            return recs[rank * k:(rank + 1) * k]

    def toy_rewarder(rec, texts, finished):
        return [{"score": float("7" in t), "finished": float(f)} for t, f in zip(texts, finished)]

    with tempfile.TemporaryDirectory() as out:
        train_grpo(policy, tok, ToySampler(), toy_rewarder,
                   GRPOConfig(steps=10, prompts_per_step=8, group_size=8, max_new_tokens=16, lr=1e-3), out)
