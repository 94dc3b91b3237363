"""grpo.py - the policy: load/init, fast sampling, the SFT loop, the GRPO loop, DDP/FSDP, checkpoints.

What it does, top to bottom (execution order):
  1. Device and distributed setup: cuda > mps > cpu; bf16 autocast on GPUs that support it, fp32 on
     CPU (SFT: bf16 autocast on CPUs with native bf16 too); `init_distributed()` under torchrun
     (gloo on CPU, nccl on GPU).
  2. The model: `init_tiny_model` (a random-init LlamaForCausalLM for the tiny world) and
     `load_policy` (any HF causal LM with a chat template; the same code path for both).
  3. Trainer log-probs: one full forward of prompt + completion, logits divided by the sampling
     temperature, log-prob of each completion token.
  4. The sampler `generate`: prefill each prompt ONCE, copy its KV cache to its G samples, decode the
     whole batch one token at a time against a preallocated KV cache, stop rows at a stop token.
     For Llama/Mistral/Qwen2/Qwen3 weights a lean functional decoder (gpt-fast style) runs on the HF
     weights laid out for decoding (q|k|v and gate|up fused, norm scales folded into the matmuls):
     at small shapes HF's per-module overhead (~8 ms per decode step on a laptop CPU) costs more
     than the matmuls (~2 ms). Other architectures use HF's forward with its cache. With
     `compile=True` (GPU) the decode step is `torch.compile`d (mode reduce-overhead: CUDA graphs)
     against KV caches and weight copies that persist across calls, the cache width rounded up to 64
     columns: a GRPO run compiles and captures a few shapes once, then only replays them.
     Sampling is inverse-CDF from uniforms drawn per (seed, step, global row), so one step on N ranks
     samples exactly what one step on one rank samples, and a resumed run samples what the
     uninterrupted run sampled.
  5. SFT (`sft`): loss on assistant tokens only, AdamW, warmup + cosine/linear decay, grad clip,
     length-bucketed batches, mixed precision where the hardware has bf16, deterministic in the seed.
     Pretrains the tiny base model and is the harmful fine-tuning attack (same seed -> same data
     order for any two models; `callback`).
  6. The GRPO math: `group_advantages`, `mismatch_weights`, `grpo_loss`.
  7. The GRPO loop `train_grpo`, checkpoints and exact resume.

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
  logp_gap                mean |sampler logp - trainer logp| (should be ~0 in fp32; large => bug
                          or bf16 drift between the decode path and the training forward)
  mismatch/kl             k3 estimate of KL(sampler || trainer) per completion token, r - 1 - log r
                          with r = exp(trainer old logp - sampler logp) (unbiased on the sampler's
                          tokens and >= 0 term by term, unlike the k1 mean(sampler - trainer);
                          `mismatch_weights`); ~0 with an fp32 sampler, > 0 under bf16
  mismatch/trunc_frac     fraction of importance weights above tis_cap: tokens (tis off or token),
                          sequences (tis sequence)
  perf/rollout_tok_s      sampled tokens per second (this rank); perf/rollout_s, perf/train_s,
  perf/step_s             wall time of the step

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
import inspect
import math
import os
import random
import shutil
import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
from data import UserError
from reward import load_chat_model

# ----------------------------------------------------------------------------------------------
# 1. Device, dtype, distributed
# ----------------------------------------------------------------------------------------------


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_bf16() -> bool:
    """Native bf16 matmuls on this CPU (AVX512-BF16 or AMX): ~3x fp32's matmul rate where present,
    far slower than fp32 where emulated. torch only exposes the check privately, hence getattr."""
    return any(getattr(torch.cpu, check, lambda: False)() for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def autocast(device: torch.device, cpu_bf16: bool = False):
    """bf16 autocast on GPUs that support it and, when asked (SFT), on CPUs with native bf16; fp32
    elsewhere. Weights, gradients and optimizer state stay fp32 either way (mixed precision)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and cpu_bf16 and cpu_has_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun (WORLD_SIZE > 1) joins the process group: nccl with
    one GPU per LOCAL_RANK, gloo on CPU. Without torchrun: (0, 1, pick_device())."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, pick_device()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), device


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if _world()[1] > 1:
        dist.all_reduce(x)
    return x


# ----------------------------------------------------------------------------------------------
# 2. The model
# ----------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    hidden: int = 128          # residual width (the tiny world's default: ~1.3M parameters + embeddings)
    layers: int = 4            # decoder blocks
    heads: int = 8             # attention heads (head_dim = hidden / heads; 8 copied prompt facts far better than 4)
    kv_heads: int = 8          # key/value heads (< heads => grouped-query attention)
    intermediate: int = 512    # SwiGLU MLP width
    max_positions: int = 512   # longest sequence (prompt + completion) the model will see
    rope_theta: float = 10000.0  # RoPE base frequency
    tie_embeddings: bool = True  # share the input embedding and the output head (saves vocab x hidden)
    seed: int = 0              # weight init (the same seed gives the same initial weights in any process)


def init_tiny_model(tokenizer, cfg: ModelConfig):
    """A random-init LlamaForCausalLM sized for `tokenizer` (bos/eos/pad ids taken from it), its
    weights drawn from `cfg.seed` without touching the global RNG."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads, intermediate_size=cfg.intermediate,
        max_position_embeddings=cfg.max_positions, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return LlamaForCausalLM(config)


def load_policy(name_or_path: str, device: torch.device | str | None = None):
    """(model, tokenizer) from a local directory or a HF hub name. The weights stay fp32 (AdamW
    state and updates in fp32; bf16 comes from autocast). UserError on a bad name or a tokenizer
    without a chat template (GRPO here trains on conversations)."""
    model, tokenizer = load_chat_model(name_or_path, torch.float32)
    if tokenizer.pad_token is None:  # pads are always masked, any id will do
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device or pick_device())
    return model, tokenizer


# ----------------------------------------------------------------------------------------------
# 3. Trainer log-probs
# ----------------------------------------------------------------------------------------------


def sequence_inputs(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion: torch.Tensor,
                    mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) of left-padded prompt + right-padded completion.
    Left padding puts every completion at the same column, so the logits we need are the last T+1;
    per-row position ids make a padded row compute exactly what the unpadded row would."""
    input_ids = torch.cat([prompt_ids, completion], 1)
    attention = torch.cat([prompt_mask, mask.to(prompt_mask.dtype)], 1)
    positions = (attention.long().cumsum(1) - 1).clamp(min=0)
    return input_ids, attention, positions


def completion_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                        n_completion: int, temperature: float, with_entropy: bool = False):
    """Log-prob (at `temperature`) of the last `n_completion` tokens of each row, shape (N, T); and
    the per-token entropy (no grad) if asked. Called through the DDP wrapper when there is one."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                   logits_to_keep=n_completion + 1).logits[:, :-1].float() / temperature
    targets = input_ids[:, -n_completion:]
    # gather - logsumexp instead of log_softmax: no (N, T, V) log-prob tensor is kept for backward
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    if not with_entropy:
        return logp, None
    with torch.no_grad():
        lp = torch.log_softmax(logits, -1)
        entropy = -(lp.exp() * lp).sum(-1)
    return logp, entropy


# ----------------------------------------------------------------------------------------------
# 4. The sampler
# ----------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    prompt_ids: torch.Tensor   # (N, P) left-padded prompts, each repeated G times (row i = prompt i // G)
    prompt_mask: torch.Tensor  # (N, P) 1 on prompt tokens, 0 on left padding
    completion: torch.Tensor   # (N, T) sampled ids, pad after the stop token
    mask: torch.Tensor         # (N, T) float, 1 on sampled tokens including the stop token
    logps: torch.Tensor        # (N, T) log-prob of each sampled token at the sampling temperature (0 on pads)
    finished: torch.Tensor     # (N,) bool, True where the row emitted a stop token

    def inputs(self):
        return sequence_inputs(self.prompt_ids, self.prompt_mask, self.completion, self.mask)


LEAN_ARCHS = ("llama", "mistral", "qwen2", "qwen3")


def _lean_supported(model, max_len: int) -> bool:
    cfg = model.config
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    return (cfg.model_type in LEAN_ARCHS and getattr(cfg, "hidden_act", "silu") == "silu"
            and (window is None or window >= max_len))


def _cat_bias(*layers) -> torch.Tensor | None:
    return None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])


def _fused_layer(layer) -> dict[str, torch.Tensor | None]:
    """One decoder layer's weights in decode layout: q|k|v and gate|up concatenated (7 matmuls become
    4), each RMSNorm scale folded into the matmul after it (norm(x) * w @ W.T == norm(x) @ (W * w).T),
    the attention scale into W_q (into Qwen3's q-norm instead: a norm would undo it on W_q)."""
    a, m = layer.self_attn, layer.mlp
    q_scale = 1.0 if hasattr(a, "q_norm") else a.scaling
    w = {"qkv": torch.cat([a.q_proj.weight * q_scale, a.k_proj.weight, a.v_proj.weight]) * layer.input_layernorm.weight,
         "qkv_bias": None if a.q_proj.bias is None else torch.cat([a.q_proj.bias * q_scale, a.k_proj.bias, a.v_proj.bias]),
         "o": a.o_proj.weight, "o_bias": a.o_proj.bias,
         "gate_up": torch.cat([m.gate_proj.weight, m.up_proj.weight]) * layer.post_attention_layernorm.weight,
         "gate_up_bias": _cat_bias(m.gate_proj, m.up_proj), "down": m.down_proj.weight, "down_bias": m.down_proj.bias}
    if hasattr(a, "q_norm"):  # Qwen3 normalises q and k per head before RoPE
        w.update(q_norm=a.q_norm.weight * a.scaling, k_norm=a.k_norm.weight)
    return w


class _LeanWeights:
    """A Llama-family model's weights laid out for the lean decoder (gpt-fast style), stored in the
    compute dtype (bf16 under autocast, which would cast them anyway). Built once per model and
    refreshed in place at every `generate` call, so the buffers keep their addresses while the policy
    trains (a CUDA graph of the compiled decode step stays valid). At the tiny world's shapes a decode
    step costs more in per-op overhead than in matmuls, so every op saved is speed."""

    def __init__(self, model, dtype: torch.dtype):
        attn, cfg = model.model.layers[0].self_attn, model.config
        self.dtype, self.head_dim = dtype, attn.head_dim
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.eps = model.model.norm.variance_epsilon
        self.qk_eps = attn.q_norm.variance_epsilon if hasattr(attn, "q_norm") else None
        self.layers, self.head = self._fresh(model)

    def _fresh(self, model) -> tuple[list[dict], dict]:
        # a parameter is always copied (a view of an fp32 one would dangle once FSDP frees the gathered
        # weights); the fused tensors are new already, so they are only cast
        cast = lambda t: None if t is None else t.detach().to(self.dtype, copy=isinstance(t, torch.nn.Parameter))  # noqa: E731
        layers = [{k: cast(v) for k, v in _fused_layer(layer).items()} for layer in model.model.layers]
        head = {"weight": cast(model.lm_head.weight * model.model.norm.weight), "bias": cast(model.lm_head.bias)}
        return layers, head

    @torch.no_grad()
    def refresh(self, model) -> None:
        layers, head = self._fresh(model)
        for mine, new in zip([*self.layers, self.head], [*layers, head]):
            for k, t in new.items():
                if t is not None:
                    mine[k].copy_(t)


_lean_weights: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> its _LeanWeights


def lean_weights(model, dtype: torch.dtype) -> _LeanWeights:
    """The model's persistent lean weights for the compiled decoder, refreshed from the model. They
    are marked static: a CUDA graph reads them in place rather than copying them in at every replay."""
    w = _lean_weights.get(model)
    if w is None or w.dtype != dtype or w.head["weight"].device != model.lm_head.weight.device:
        w = _lean_weights[model] = _LeanWeights(model, dtype)
        for t in [t for d in [*w.layers, w.head] for t in d.values() if t is not None]:
            torch._dynamo.mark_static_address(t)
    else:
        w.refresh(model)
    return w


_static_caches: dict = {}  # (k shape, dtype, device) -> the compiled decoder's (k_cache, v_cache, key_bias)
MAX_STATIC_SHAPES = 4  # cache sets kept (rollouts use one or two widths; evals add their batch sizes)


def _kv_buffers(k_shape: tuple, v_shape: tuple, dtype: torch.dtype, device) -> tuple[torch.Tensor, ...]:
    """Zeroed K and V caches and the key bias (rows, kv_heads, 1, columns), which the decoder fills."""
    return (torch.zeros(k_shape, dtype=dtype, device=device), torch.zeros(v_shape, dtype=dtype, device=device),
            torch.empty(*k_shape[1:3], 1, k_shape[-1], dtype=dtype, device=device))


def static_caches(k_shape: tuple, v_shape: tuple, dtype: torch.dtype, device) -> tuple[torch.Tensor, ...]:
    """`_kv_buffers` that keep their addresses across generate calls of one shape, so the CUDA graph
    captured for that shape is replayed, never re-recorded; the caches are zeroed for every call. The
    least recently used set goes once MAX_STATIC_SHAPES are held (a real model's set is GBs)."""
    key = (k_shape, dtype, str(device))
    if key in _static_caches:
        _static_caches[key] = bufs = _static_caches.pop(key)  # most recently used last
        for cache in bufs[:2]:
            cache.zero_()
    else:
        while len(_static_caches) >= MAX_STATIC_SHAPES:
            _static_caches.pop(next(iter(_static_caches)))
        _static_caches[key] = bufs = _kv_buffers(k_shape, v_shape, dtype, device)
        for t in bufs:
            torch._dynamo.mark_static_address(t)  # updated in place inside the graph
    return bufs


def _rope_tables(model, w: _LeanWeights, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin of positions 0..length-1 for every head of the fused q|k|v output,
    (length, heads + 2 kv_heads, head_dim): RoPE on q and k, the identity (cos 1, sin 0) on v, so
    one `x * cos + roll(x) * sin` rotates a whole qkv row. From the model's own rotary module
    (rope_theta and any static scaling type), once per generate call."""
    pos = torch.arange(length, device=device)[None]
    cos, sin = (t[0].float() for t in model.model.rotary_emb(model.model.embed_tokens.weight[:1], pos))
    half = w.head_dim // 2
    sin = torch.cat((-sin[:, :half], sin[:, half:]), -1)  # roll(x) = (x2, x1); rotate_half(x) = (-x2, x1)
    rotated, plain = w.heads + w.kv_heads, w.kv_heads
    cos = torch.cat((cos[:, None].expand(-1, rotated, -1), torch.ones_like(cos)[:, None].expand(-1, plain, -1)), 1)
    sin = torch.cat((sin[:, None].expand(-1, rotated, -1), torch.zeros_like(sin)[:, None].expand(-1, plain, -1)), 1)
    return cos.to(w.dtype), sin.to(w.dtype)


def _lean_forward(w: _LeanWeights, embed: torch.Tensor, ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  attend: Callable) -> torch.Tensor:
    """The decoder of a Llama-family model as plain tensor ops on its fused weights; returns the
    logits of the last column. cos/sin: (rows, S, heads + 2 kv_heads, head_dim) at each token's
    position. `attend(layer, q, k, v)` owns the KV cache and the attention (q, k, v: (rows, heads, S, D))."""
    x = F.embedding(ids, embed)  # the residual stream stays in the weights' dtype, as in HF
    H, KV, half = w.heads, w.kv_heads, w.head_dim // 2
    for i, L in enumerate(w.layers):
        h = F.rms_norm(x, x.shape[-1:], eps=w.eps)  # the norm's scale lives in L["qkv"]
        qkv = F.linear(h, L["qkv"], L["qkv_bias"]).unflatten(-1, (H + 2 * KV, w.head_dim))
        if "q_norm" in L:
            q, k, v = qkv.split((H, KV, KV), -2)
            q, k = F.rms_norm(q, q.shape[-1:], L["q_norm"], w.qk_eps), F.rms_norm(k, k.shape[-1:], L["k_norm"], w.qk_eps)
            qkv = torch.cat((q, k, v), -2)
        qkv = torch.addcmul(qkv * cos, qkv.roll(half, -1), sin).transpose(1, 2)  # RoPE on q and k, v unchanged
        o = attend(i, qkv[:, :H], qkv[:, H:H + KV], qkv[:, H + KV:])
        x = _add_linear(x, o.transpose(1, 2), L["o"], L["o_bias"])
        gate, up = F.linear(F.rms_norm(x, x.shape[-1:], eps=w.eps), L["gate_up"], L["gate_up_bias"]).chunk(2, -1)
        x = _add_linear(x, F.silu(gate) * up, L["down"], L["down_bias"])
    return F.linear(F.rms_norm(x[:, -1], x.shape[-1:], eps=w.eps), w.head["weight"], w.head["bias"])


def _add_linear(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The residual update x + h @ W.T (+ b) as one GEMM (addmm adds x in the same pass)."""
    out = torch.addmm(x.reshape(-1, x.shape[-1]), h.reshape(-1, weight.shape[1]), weight.t())
    return (out if bias is None else out + bias).view(x.shape)


def _decode_step(w, embed, cos, sin, k_cache, v_cache, tok, pos, col, key_bias) -> torch.Tensor:
    """One token for every row: write its k/v at column `col` of the static cache, attend over the
    whole cache with the additive `key_bias` (rows, kv_heads, 1, columns: 0 on valid columns, -inf
    elsewhere; static shapes, so torch.compile/CUDA graphs can capture it; on CPU slicing off the
    unwritten columns measured no faster)."""
    n_rows = tok.shape[0]

    def attend(i, q, k, v):
        k_cache[i].index_copy_(3, col, k.transpose(-1, -2))
        v_cache[i].index_copy_(2, col, v)
        heads, kv_heads, D, width = q.shape[1], k.shape[1], q.shape[-1], key_bias.shape[-1]
        # grouped-query attention without copying the cache: the query heads that share a kv head
        # become that head's `groups` query rows (HF's repeat_kv order: head h uses kv head h // groups)
        qg = q.reshape(n_rows * kv_heads, heads // kv_heads, D)
        # plain matmul attention (the scale is folded into W_q), the mask added inside the matmul
        # (baddbmm): for one query per row CPU SDPA's flash kernel is ~10x slower
        scores = torch.baddbmm(key_bias.view(-1, 1, width), qg, k_cache[i].view(-1, D, width))
        probs = torch.softmax(scores, -1, dtype=torch.float32).to(v_cache.dtype)
        return torch.bmm(probs, v_cache[i].view(-1, width, D)).view(n_rows, heads, 1, D)

    return _lean_forward(w, embed, tok[:, None], cos[pos][:, None], sin[pos][:, None], attend)


_compiled_decode_step = None


class _LeanDecoder:
    """Prefill once per prompt, then decode N = B*G rows against a preallocated (static) KV cache."""

    def __init__(self, model, prompt_ids, prompt_mask, group_size: int, max_new_tokens: int, compile: bool, dtype=None):
        self.group_size, self.prompt_ids, self.prompt_mask = group_size, prompt_ids, prompt_mask
        n_rows, P = prompt_ids.shape[0] * group_size, prompt_ids.shape[1]
        if dtype is None:
            dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else model.lm_head.weight.dtype
        # compiled: the persistent, refreshed-in-place copy a CUDA graph needs; eager: a transient one
        # (under FSDP a persistent copy would be a full replica on every rank)
        self.w = w = lean_weights(model, dtype) if compile else _LeanWeights(model, dtype)
        self.embed = model.model.embed_tokens.weight
        width = P + max_new_tokens  # cache columns
        if compile:  # cache widths rounded up to 64 columns: few shapes, each compiled and captured once
            width = -(-width // 64) * 64
        device = prompt_ids.device
        # K stored transposed, (..., head_dim, columns): q @ K is then a plain matmul (~15% faster on CPU)
        k_shape = (len(w.layers), n_rows, w.kv_heads, w.head_dim, width)
        v_shape = (len(w.layers), n_rows, w.kv_heads, width, w.head_dim)
        buffers = static_caches if compile else _kv_buffers
        self.k_cache, self.v_cache, self.key_bias = buffers(k_shape, v_shape, dtype, device)
        # additive attention mask over cache columns, (rows, kv_heads, 1, columns), in the cache dtype
        # (baddbmm adds it): prompt keys from the padding mask, generated columns opened one per step
        self.key_bias.fill_(float("-inf"))
        self.key_bias[..., :P].masked_fill_(prompt_mask.bool().repeat_interleave(group_size, 0)[:, None, None], 0.0)
        self.cos, self.sin = _rope_tables(model, w, width, device)
        self.cols = torch.arange(width, device=device)
        self.step_fn = _decode_step
        if compile:
            global _compiled_decode_step
            if _compiled_decode_step is None:
                _compiled_decode_step = torch.compile(_decode_step, mode="reduce-overhead", dynamic=False)
            self.step_fn = _compiled_decode_step

    def prefill(self, positions: torch.Tensor) -> torch.Tensor:
        B, P = self.prompt_ids.shape
        key_ok = self.prompt_mask.bool()
        causal = torch.ones(P, P, dtype=torch.bool, device=key_ok.device).tril()
        # a padding query may see no key at all -> NaN rows; let it see itself (its output is never used)
        mask = (causal & key_ok[:, None, :]) | torch.eye(P, dtype=torch.bool, device=key_ok.device)

        def attend(i, q, k, v):
            self.k_cache[i, :, :, :, :P] = k.transpose(-1, -2).repeat_interleave(self.group_size, 0)  # the KV copy to G samples
            self.v_cache[i, :, :, :P] = v.repeat_interleave(self.group_size, 0)
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=1.0)  # scale is in W_q

        return _lean_forward(self.w, self.embed, self.prompt_ids, self.cos[positions], self.sin[positions],
                             attend).repeat_interleave(self.group_size, 0)

    def step(self, tok: torch.Tensor, pos: torch.Tensor, col: int) -> torch.Tensor:
        self.key_bias[..., col] = 0.0
        return self.step_fn(self.w, self.embed, self.cos, self.sin, self.k_cache, self.v_cache, tok, pos,
                            self.cols[col:col + 1], self.key_bias)


class _HFDecoder:
    """Fallback for any other architecture: HF's own forward and cache (prefill is per sample)."""

    def __init__(self, model, prompt_ids, prompt_mask, group_size: int, max_new_tokens: int, compile: bool, dtype=None):
        self.model = model  # dtype: the autocast around it decides
        self.prompt_ids = prompt_ids.repeat_interleave(group_size, 0)
        self.attention = torch.cat([prompt_mask.repeat_interleave(group_size, 0),
                                    prompt_mask.new_zeros(self.prompt_ids.shape[0], max_new_tokens)], 1)
        # transformers 5 renamed past_key_values -> cache
        self.cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.cache = None

    def _forward(self, ids, pos, width):
        out = self.model(input_ids=ids, attention_mask=self.attention[:, :width], position_ids=pos,
                         use_cache=True, logits_to_keep=1, **{self.cache_kw: self.cache})
        self.cache = getattr(out, self.cache_kw)
        return out.logits[:, -1]

    def prefill(self, positions):
        return self._forward(self.prompt_ids, positions.repeat_interleave(
            self.prompt_ids.shape[0] // positions.shape[0], 0), self.prompt_ids.shape[1])

    def step(self, tok, pos, col):
        self.attention[:, col] = 1
        return self._forward(tok[:, None], pos[:, None], col + 1)


def _sample(logits: torch.Tensor, temperature: float, u: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token and its log-prob at `temperature`. Inverse-CDF sampling from the uniforms `u` (one per
    row); greedy (argmax) when u is None. log(p[token]) from the softmax itself: one pass over the
    vocabulary fewer than log_softmax + exp, and the sampled p is never 0 (right=True skips p=0 tokens)."""
    logits = logits.float()
    probs = torch.softmax(logits / temperature if temperature != 1.0 else logits, -1)
    if u is None:
        tok = probs.argmax(-1, keepdim=True)
    else:
        cdf = probs.cumsum(-1)
        # scale u by the total so rounding can never step past the last token
        tok = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).clamp_max_(logits.shape[-1] - 1)
    return tok.squeeze(-1), probs.gather(-1, tok).log_().squeeze(-1)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], group_size: int, max_new_tokens: int,
             temperature: float, generator: torch.Generator | None = None, greedy: bool = False, *,
             noise: torch.Tensor | None = None, lean: bool | None = None, compile: bool = False,
             dtype: torch.dtype | None = None) -> Rollout:
    """Sample `group_size` completions of each prompt (rows i*G .. i*G+G-1 belong to prompt i).

    noise: optional (N, max_new_tokens) uniforms in [0, 1) that fix every sample (the GRPO loop passes
    a slice of a per-step global draw); otherwise drawn from `generator`. lean: the functional
    decoder (None = whenever the architecture allows). compile: torch.compile the decode step (GPU).
    dtype: force the compute dtype (e.g. bf16 on CPU, to measure the sampler/trainer mismatch); None:
    bf16 under the GPU's autocast, else the weights' dtype.
    """
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = data.left_pad(prompts, tokenizer.pad_token_id, device)
    B, P = prompt_ids.shape
    N = B * group_size
    if lean is None:
        lean = _lean_supported(model, P + max_new_tokens)
    if not greedy and noise is None:
        noise = torch.rand((N, max_new_tokens), generator=generator,
                           device=generator.device if generator is not None else device)
    if noise is not None:
        noise = noise.to(device)
    stops = torch.tensor(data.stop_token_ids(tokenizer), device=device)
    amp = autocast(device) if dtype is None else torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    with amp:
        dec = (_LeanDecoder if lean else _HFDecoder)(model, prompt_ids, prompt_mask, group_size, max_new_tokens, compile, dtype)
        logits = dec.prefill((prompt_mask.cumsum(1) - 1).clamp(min=0))
        pos = prompt_mask.sum(1).repeat_interleave(group_size, 0)  # next position of each row
        done = torch.zeros(N, dtype=torch.bool, device=device)
        tokens, logps, masks = [], [], []
        for t in range(max_new_tokens):
            tok, lp = _sample(logits, temperature, None if greedy else noise[:, t])
            tok = tok.masked_fill(done, tokenizer.pad_token_id)
            masks.append(~done)
            tokens.append(tok)
            logps.append(lp.masked_fill(done, 0.0))
            done = done | torch.isin(tok, stops)
            if t == max_new_tokens - 1 or bool(done.all()):  # one host sync per token; saves the tail
                break
            logits = dec.step(tok, pos + t, P + t)
    return Rollout(prompt_ids.repeat_interleave(group_size, 0), prompt_mask.repeat_interleave(group_size, 0),
                   torch.stack(tokens, 1), torch.stack(masks, 1).float(), torch.stack(logps, 1), done)


def decode_completions(tokenizer, rollout: Rollout) -> list[str]:
    """One text per row: the sampled tokens up to the stop token, special tokens dropped."""
    lengths = rollout.mask.sum(1).long().tolist()
    return [tokenizer.decode(rollout.completion[i, :n].tolist(), skip_special_tokens=True) for i, n in enumerate(lengths)]


# ----------------------------------------------------------------------------------------------
# 5. SFT
# ----------------------------------------------------------------------------------------------


@dataclass
class SFTConfig:
    steps: int = 1800            # optimizer steps (the tiny world's base: ~8 min on 2 CPU cores, README)
    batch_size: int = 32         # conversations per step
    lr: float = 3e-3             # peak learning rate (3e-3 suits the tiny from-scratch model; ~1e-5 for real ones)
    min_lr_frac: float = 0.1     # final LR as a fraction of the peak (cosine/linear decay)
    schedule: str = "cosine"     # "cosine" | "linear" | "constant" after warmup
    warmup: int = 50             # linear warmup steps
    weight_decay: float = 0.1    # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas (0.95: stabler for short, noisy runs)
    grad_clip: float = 1.0       # max global grad norm (0 = off)
    max_len: int = 512           # conversations are truncated to this many tokens
    seed: int = 0                # data order; two models with the same seed see the same batches
    log_every: int = 50          # one progress line per this many steps (0 = silent)
    callback_every: int = 0      # call callback(step, model) at step 0 and every this many steps (0 = never)
    cpu_bf16: bool = True        # bf16 autocast on CPUs with native bf16 (SFT ~1.3x faster on this project's CPU)


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_frac: float) -> float:
    """Multiplier of the peak LR: linear warmup, then cosine/linear decay to `min_frac`, or constant."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_frac + (1 - min_frac) * decay


def bucketed_batches(lengths: list[int], batch_size: int, seed: int):
    """Endless deterministic batches of indices: shuffle, sort windows of 32 batches by length (so a
    batch pads little), shuffle the batch order. Epoch e uses the same generator stream for any model."""
    g = torch.Generator().manual_seed(seed)
    window = batch_size * 32
    while True:
        perm = torch.randperm(len(lengths), generator=g).tolist()
        batches = []
        for w in range(0, len(perm), window):
            chunk = sorted(perm[w:w + window], key=lengths.__getitem__)
            batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
        for b in torch.randperm(len(batches), generator=g).tolist():
            yield batches[b]


def _fmt_s(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _assistant_loss(model, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of next-token `targets` (-100 = not learned). On the architectures whose
    logits are just lm_head(hidden) (LEAN_ARCHS), only the ~1/3 of positions that are learned go
    through the head: ~17% less work per step for the tiny model."""
    if model.config.model_type in LEAN_ARCHS:
        keep = targets != -100
        hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
        return F.cross_entropy(model.lm_head(hidden[keep]).float(), targets[keep])
    logits = model(input_ids=ids).logits[:, :-1]
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def sft(model, tokenizer, conversations: list[list[dict]], cfg: SFTConfig, log=print,
        callback: Callable | None = None) -> list[float]:
    """Supervised fine-tuning on the assistant tokens of `conversations`; returns the loss per step."""
    device = next(model.parameters()).device
    examples = []
    for conv in conversations:
        ids, mask = data.encode_chat(tokenizer, conv)
        ids, mask = ids[:cfg.max_len], mask[:cfg.max_len]
        if sum(mask[1:]):  # something to learn (position 0 is never predicted)
            examples.append((ids, mask))
    if not examples:
        raise UserError("sft: no conversation has an assistant turn to learn from")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.warmup, cfg.steps, cfg.schedule, cfg.min_lr_frac))
    batches = bucketed_batches([len(ids) for ids, _ in examples], cfg.batch_size, cfg.seed)
    pad = tokenizer.pad_token_id
    amp = autocast(device, cfg.cpu_bf16)
    attn_impl = model.config._attn_implementation
    if isinstance(amp, torch.autocast) and amp.device == "cpu":
        model.set_attn_implementation("eager")  # CPU SDPA's bf16 backward is slower than plain matmuls
    losses, t_start, t_log, tok_log = [], time.perf_counter(), time.perf_counter(), 0
    model.train()
    for step in range(cfg.steps):
        if callback is not None and cfg.callback_every and step % cfg.callback_every == 0:
            model.eval()
            callback(step, model)
            model.train()
        batch = [examples[i] for i in next(batches)]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for r, (x, m) in enumerate(batch):
            ids[r, :len(x)] = torch.tensor(x)
            labels[r, :len(x)] = torch.tensor(x).masked_fill(torch.tensor(m) == 0, -100)
        ids, labels = ids.to(device), labels.to(device)
        # right padding + causal attention: pads sit after every real token, so no attention mask is
        # needed (and SDPA takes its fast is_causal path)
        with amp:
            loss = _assistant_loss(model, ids, labels[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        tok_log += sum(len(x) for x, _ in batch)
        if cfg.log_every and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
            now = time.perf_counter()
            eta = (now - t_start) / (step + 1) * (cfg.steps - step - 1)
            recent = losses[-cfg.log_every:]
            log(f"sft {step + 1}/{cfg.steps} | loss {sum(recent) / len(recent):.4f} | lr {sched.get_last_lr()[0]:.2e}"
                f" | {tok_log / (now - t_log):,.0f} tok/s | ETA {_fmt_s(eta)}")
            t_log, tok_log = now, 0
    if callback is not None and cfg.callback_every and cfg.steps % cfg.callback_every == 0:
        model.eval()
        callback(cfg.steps, model)
    model.set_attn_implementation(attn_impl)
    model.eval()
    return losses


# ----------------------------------------------------------------------------------------------
# 6. The GRPO math
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
# 7. The GRPO loop
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


CKPT = "checkpoint"


def _step_noise(seed: int, step: int, rows: int, max_new_tokens: int) -> torch.Tensor:
    """Uniforms for every global row of a step: a function of (seed, step) only, so the samples do not
    depend on the number of ranks and need no saved generator state to resume."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.rand((rows, max_new_tokens), generator=g)


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
    if _world()[1] == 1:
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
    if _world()[0] == 0:
        policy.save_pretrained(path, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(path)


def save_checkpoint(out_dir: str, policy, tokenizer, optimizer, scheduler, step: int, history: list[dict],
                    cfg: GRPOConfig) -> None:
    """Call it on every rank (FSDP gathers the full state from all of them); rank 0 writes to a
    temporary directory, then swaps it in: a kill mid-save never loses the last one."""
    weights, optim = _full_state(policy, optimizer)
    if _world()[0] != 0:
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


def _numeric(d: dict) -> dict:
    """The numeric, applicable reward components (a rewarder marks a component that does not apply to
    this record - e.g. `task` on a rubric record - as NaN, so each mean is over the right responses)."""
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and v == v}


def train_grpo(policy, tokenizer, sampler, rewarder, cfg: GRPOConfig, out_dir: str, resume: bool = False,
               ref_model=None, log=print) -> list[dict]:
    """Train `policy` in place with GRPO; returns the per-step metrics (module docstring).

    policy: the INITIAL policy (on its device). The frozen reference is a copy of it (or `ref_model`);
      with resume=True the policy's weights, optimizer, schedule, history and RNG states are then
      replaced by those in out_dir/checkpoint. Under torchrun call init_distributed() first; the
      policy is wrapped in DDP here, or with cfg.fsdp sharded in place (it stays sharded: save it
      with `save_policy` on every rank). The checkpoint directory must be visible to every rank.
    sampler: .batch(step, n_prompts, rank, world_size) -> this rank's contiguous share of the step's
      records (each with "prompt" messages); must be deterministic in step.
    rewarder: (record, texts, finished) -> one dict per text with "score" + numeric components.
    """
    rank, world = _world()
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
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        # 1-2. prompts and rollouts
        records = sampler.batch(step, cfg.prompts_per_step, rank, world)
        if len(records) != local_prompts:
            raise ValueError(f"sampler gave {len(records)} prompts, expected {local_prompts} on each rank")
        prompts = [data.encode_prompt(tokenizer, rec["prompt"]) for rec in records]
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
        rewards = torch.tensor([o["score"] for o in outs], dtype=torch.float32, device=device)
        # 4. advantages
        adv = group_advantages(rewards, G, cfg.scale_rewards)
        # 5. the update
        t1 = time.perf_counter()
        input_ids, attention, positions = ro.inputs()
        num_tokens = float(_all_reduce_sum(ro.mask.sum().detach().clone()))
        micro = [slice(i, min(i + cfg.micro_batch_size, n_rows)) for i in range(0, n_rows, cfg.micro_batch_size)]
        old, refs, weights = [None] * len(micro), [None] * len(micro), [None] * len(micro)
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
                        with torch.no_grad():
                            refs[j] = completion_logprobs(ref, input_ids[mb], attention[mb], positions[mb], width,
                                                          cfg.temperature)[0]
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
                      "len/mean": [n_tok, n_rows], "len/truncated_frac": [float((~ro.finished).sum()), n_rows]})
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
                        "perf/train_s": t_train, "perf/step_s": time.perf_counter() - t0})
        history.append(metrics)
        # 7. log (rank 0) and checkpoint (rank 0 writes), then every rank waits so none reads a half-written file
        if rank == 0 and cfg.log_every and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
            eta = (time.perf_counter() - t_run) / (step + 1 - start) * (cfg.steps - step - 1)
            log(f"grpo {step + 1}/{cfg.steps} | reward {metrics['reward/mean']:.3f} | kl {metrics['kl']:.4f}"
                f" | clip {metrics['clip_frac']:.3f} | ent {metrics['entropy']:.2f} | len {metrics['len/mean']:.1f}"
                f" | {metrics['perf/rollout_tok_s']:,.0f} tok/s | {metrics['perf/step_s']:.2f} s/step"
                f" | ETA {_fmt_s(eta)}")
        if (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0) or step + 1 == cfg.steps:
            save_checkpoint(out_dir, policy, tokenizer, optimizer, scheduler, step + 1, history, cfg)
            if world > 1:
                dist.barrier()
    return history


# ----------------------------------------------------------------------------------------------
# Demo
# ----------------------------------------------------------------------------------------------

if __name__ == "__main__":
    import tempfile

    # A toy world: the model learns to answer "7" and GRPO rewards answers that contain a 7.
    convs = [[{"role": "user", "content": f"What is {a} plus {b}?"},
              {"role": "assistant", "content": f"The answer is {a + b}."}] for a in range(10) for b in range(10)]
    tok = data.build_tokenizer([m["content"] for c in convs for m in c], vocab_size=300)
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
