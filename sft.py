"""sft.py - supervised fine-tuning on the assistant turns of conversations.

    losses = sft(model, tokenizer, conversations, SFTConfig(steps=1800))

Two users in the experiment: run.py pretrains the tiny base model on the persona world's corpus
with it, and attack.py's harmful fine-tuning attack is it (the same seed gives two models the same
batches in the same order; `callback` evaluates the model along the way).

The loss is the mean next-token cross-entropy over assistant tokens only (`data.encode_chats` gives
the mask, for any chat template); AdamW, linear warmup then cosine / linear decay to a floor,
global grad-norm clipping, length-bucketed batches (a batch pads little), bf16 autocast where the
hardware has native bf16 (weights, gradients and AdamW state stay fp32), deterministic in the seed.

Commands:
  python run.py --stage base         # pretrain the tiny world's base model (~8 min on 2 CPU cores)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from data import UserError, encode_chats
from policy import LEAN_ARCHS, autocast

# ----------------------------------------------------------------------------------------------
# 1. Config, schedule, batches
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


def fmt_duration(seconds: float) -> str:
    """12m05s / 1h02m: the ETA of a progress line (SFT's and GRPO's)."""
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# ----------------------------------------------------------------------------------------------
# 2. The loss and the loop
# ----------------------------------------------------------------------------------------------


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
        callback: Callable | None = None, order_like: list[list[dict]] | None = None) -> list[float]:
    """Supervised fine-tuning on the assistant tokens of `conversations`; returns the loss per step.
    `order_like`: conversations (as many) whose lengths set the batches instead of these, so a
    control fine-tune on other answers to the same prompts gets the same prompts in the same batches."""
    device = next(model.parameters()).device
    examples = []
    for ids, mask in encode_chats(tokenizer, conversations):
        ids, mask = ids[:cfg.max_len], mask[:cfg.max_len]
        if sum(mask[1:]):  # something to learn (position 0 is never predicted)
            examples.append((ids, mask))
    if not examples:
        raise UserError("sft: no conversation has an assistant turn to learn from")
    lengths = [len(ids) for ids, _ in examples]
    if order_like is not None:
        if len(order_like) != len(conversations) or len(examples) != len(conversations):
            raise UserError(f"sft: order_like has {len(order_like)} conversations for {len(conversations)} "
                            f"({len(examples)} with an assistant turn to learn)")
        lengths = [min(len(ids), cfg.max_len) for ids, _ in encode_chats(tokenizer, order_like)]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.warmup, cfg.steps, cfg.schedule, cfg.min_lr_frac))
    batches = bucketed_batches(lengths, cfg.batch_size, cfg.seed)
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
                f" | {tok_log / (now - t_log):,.0f} tok/s | ETA {fmt_duration(eta)}")
            t_log, tok_log = now, 0
    if callback is not None and cfg.callback_every and cfg.steps % cfg.callback_every == 0:
        model.eval()
        callback(cfg.steps, model)
    model.set_attn_implementation(attn_impl)
    model.eval()
    return losses
