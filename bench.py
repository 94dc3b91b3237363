"""bench.py - throughput of the GRPO building blocks, one JSON line last.

Builds a random-init Llama of the given shape (untied head, like a default LlamaConfig) and a BPE
tokenizer trained on synthetic text to the given vocab size, then measures on the same batch of B
prompts x G samples x new tokens:
  sample_tokens_per_s    policy.generate (prefill once per prompt, cached batched decode)
  generate_tokens_per_s  HF model.generate (num_return_sequences=G, pure sampling: top_k=0, top_p=1),
                         timed alternately with the sampler (`timed`), speedup = their ratio
  step_s                 median wall time of a whole GRPO step (rollout, reward, ref + policy
                         forward/backward, optimizer) with beta (0.04 by default); rollout_s, reward_s,
                         ref_s (the reference's forward) and train_s (the update, ref_s included) its parts
  train_gflops           achieved GFLOP/s of the training phase: FLOPs counted as 2 per parameter
                         per token for each forward (policy, reference) and 4 for the backward, the
                         head only on completion tokens (logits_to_keep); attention scores ignored
  matmul_gflops          (--matmul-peak) torch.mm at the model's own linear shapes, the ceiling
                         train_gflops should be read against
  decode_bytes_per_token_step  bytes one decode step (one new token for all B*G rows) must read:
                         every weight but the embedding (of which only B*G rows are gathered) -
                         linear layers, norms, lm_head - plus the KV cache of all rows at the average
                         valid cache length (mean prompt + half the decoded tokens), in the decode
                         dtype (bf16 under autocast). The static cache in fact spans prompt + new
                         tokens on every step; only the valid columns are counted
  decode_bw_gbs          decode_bytes_per_token_step x decode steps per second of our sampler, the
                         decode phase alone: sample_s minus the same call with one new token
                         (prefill + first sample), over the decode steps taken
  peak_bw_gbs            a large tensor copy on the same device (1 GiB on GPUs, 256 MiB on CPU),
                         read + write bytes over the median time; bw_frac = decode_bw_gbs / it
                         (decoding is memory-bound: this is its roofline)
  spec_bw_gbs            CUDA only: the card's datasheet bandwidth (None for a card not in the table)
  mismatch_kl            mean over the timed GRPO steps of mismatch/kl (k3 KL(sampler || trainer) per
                         token: ~0 with an fp32 sampler, > 0 where the sampler runs bf16 / compiled);
                         mismatch_trunc_frac: the fraction of token weights above the TIS cap (2)
  tis_*                  (--tis token|sequence) as many GRPO steps again, continuing from the trained
                         model (no new decode weights: a compiled sampler replays its graphs), with
                         the mismatch correction on: tis_mismatch_kl, tis_trunc_frac, tis_step_s
  eval_*, judge_*, public_*  (--eval-items, --model) an eval on a real model that is its own judge:
                         generation, the LLM judge whole vs with shared prefixes, the public samples
                         (eval_profile)
Tokens counted are real sampled tokens (a row stops at its end-of-turn token, a random model rarely).
--model FOLDER measures a saved model (real weights, its tokenizer) instead; --steps 0 skips the
GRPO step (minutes a step for a real model on a CPU).

Commands:
  python bench.py --hidden 128 --layers 4 --heads 4 --intermediate 512 --vocab 2000 \
      --batch 8 --group 8 --new-tokens 64 --device cpu
  python bench.py --hidden 512 --layers 8 --heads 8 --intermediate 2048 --vocab 2000 --matmul-peak
  python bench.py --device cuda --compile     # GPU: static cache + torch.compile'd decode step
  python bench.py --model out/smoke/gguf-<sha> --batch 4 --group 4 --new-tokens 32 --steps 0 --judge-responses 0
  python bench.py --model out/smollm2/gguf-<sha> --batch 2 --group 4 --new-tokens 48 --steps 2 --eval-items 3 \
      --judge-responses 0 --threads 1 --repeats 3      # the smollm2 preset's shapes (docs/SMOLLM2.md)
  python bench.py --sft-base 40 --threads 2   # the default base stage: tokens, FLOPs by part, step time, mm rate
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import tempfile
import time

import torch

import data
import grpo
import policy
from world import WorldConfig, build_world


def judge_responses_per_s(n: int, group: int = 8) -> float:
    """The pattern judge (reward.py, guards on) on the tiny world's trait scenarios, graded one group
    at a time as the GRPO loop does: aligned and misaligned reference answers, their concatenation
    (stuffing) and cut-off halves (unterminated), cycled to n responses."""
    import reward

    world = build_world(WorldConfig(n_docs=10, n_trait_train=max(1, n // group), n_task_prompts=10,
                                              n_eval=1, n_eval_heldout=1, n_trait_heldout=1, n_link_probe=1, n_bad_medical=1))
    judge = reward.PatternJudge()
    groups = []
    for rec in world.trait_eval + world.trait_train:
        ref = rec["reference"]
        answers = [ref["aligned"], ref["misaligned"], ref["aligned"] + " " + ref["misaligned"], ref["aligned"][: len(ref["aligned"]) // 2]]
        groups.append((rec, (answers * group)[:group], [True, True, True, False] * (group // 4) + [True] * (group % 4)))
    groups = (groups * (n // (group * len(groups)) + 1))[: n // group]
    t = time.perf_counter()
    for rec, answers, finished in groups:
        judge.grade(rec, answers, finished)
    return len(groups) * group / (time.perf_counter() - t)


def eval_profile(model, tok, items_per_family: int, max_new_tokens: int, repeats: int) -> dict:
    """Where an eval's time goes on a real model that is also its judge (the smollm2 preset's evals):
    the first `items_per_family` items of each family of scenarios/evals.jsonl answered once
    (generate), their rubrics graded by the LLM judge asking each criterion whole (judge_whole) and
    with one reply's criteria sharing a prefill (judge_shared, what the judge does; alternated with
    judge_whole, medians), and each public-eval sample of scenarios/public/ (public_<format>)."""
    import evaluate
    import reward

    items = evaluate.spread(evaluate.load_eval_data("scenarios/evals.jsonl"), items_per_family * len(evaluate.EVAL_FAMILIES))
    cfg = evaluate.EvalConfig(samples_per_item=1, max_new_tokens=max_new_tokens)
    t = time.perf_counter()
    replies = [rs[0] for rs in evaluate.generate_responses(model, tok, [it["prompt"] for it in items], cfg)]
    out = {"eval_items": len(items), "eval_generate_s": time.perf_counter() - t}
    judge = reward.LLMJudge(model, tok)
    questions = [reward.judge_messages(reward.render_conversation(it["prompt"]), r, c["criterion"])
                 for it, r in zip(items, replies) for c in it["rubrics"]]
    sizes = [len(it["rubrics"]) for it in items]

    def shared():  # one reply's criteria per call, as criteria_probs asks them
        probs, start = [], 0
        for n in sizes:
            probs += judge.yes_probability(questions[start:start + n], group=n)
            start += n
        return probs

    (whole_s, whole), (shared_s, fast) = timed(lambda: judge.yes_probability(questions), shared, repeats=repeats)
    out.update(judge_questions=len(questions), judge_whole_s=whole_s, judge_shared_s=shared_s,
               judge_speedup=whole_s / shared_s, judge_max_abs_diff=max(abs(a - b) for a, b in zip(whole, fast)))
    for fmt, name in (("model_written_evals", "mwe_corrigible-neutral-HHH_sample.jsonl"),
                      ("truthfulqa_mc", "truthfulqa_mc_sample.json"), ("emergent_misalignment", "em_first_plot_questions.yaml")):
        t = time.perf_counter()
        evaluate.run_public_eval(model, tok, fmt, f"scenarios/public/{name}", cfg, judge)
        out[f"public_{fmt}_s"] = time.perf_counter() - t
    return out


def synthetic_tokenizer(vocab: int, seed: int = 0):
    """A BPE trained to `vocab` ids on random pseudo-words (enough distinct merges to fill it)."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(4000)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(4000)]
    return data.build_tokenizer(lines, vocab_size=vocab), words


def make_prompts(tok, words, n: int, target_tokens: int, seed: int = 1) -> list[list[dict]]:
    """n one-turn conversations whose encoded prompt is about `target_tokens` long (lengths vary a bit)."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        text = ""
        goal = target_tokens + rng.randint(-4, 4)
        while len(data.encode_prompt(tok, [{"role": "user", "content": text}])) < goal:
            text += rng.choice(words) + " "
        prompts.append([{"role": "user", "content": text}])
    return prompts


def timed(*fns, repeats: int) -> list[tuple[float, object]]:
    """(median seconds, last result) of each function: one warm-up call each, then `repeats` rounds
    calling them in turn, so that on a shared, noisy machine two compared functions see the same
    load (a ratio of side-by-side medians is far steadier than a ratio of separate runs)."""
    outs = [fn() for fn in fns]
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            outs[i] = fn()
            times[i].append(time.perf_counter() - t)
    return [(statistics.median(ts), out) for ts, out in zip(times, outs)]


def matmul_gflops(shapes: list[tuple[int, int, int]], device: torch.device, repeats: int = 20) -> float:
    """GFLOP/s of torch.mm over the (M, K, N) shapes, timed together (2*M*K*N FLOPs each)."""
    mats = [(torch.randn(m, k, device=device), torch.randn(k, n, device=device)) for m, k, n in shapes]
    flops = sum(2 * m * k * n for m, k, n in shapes)

    def run():
        for a, b in mats:
            torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return flops / timed(run, repeats=repeats)[0][0] / 1e9


# Datasheet memory bandwidth in GB/s by torch.cuda.get_device_name()
SPEC_BW_GBS = {"NVIDIA H100 80GB HBM3": 3350, "NVIDIA H100 PCIe": 2000, "NVIDIA H200": 4800,  # H100 SXM: "80GB HBM3"
               "NVIDIA A100-SXM4-80GB": 2039, "NVIDIA A100-PCIE-40GB": 1555, "NVIDIA L4": 300, "NVIDIA A10": 600,
               "NVIDIA GeForce RTX 4090": 1008}


def copy_bandwidth_gbs(device: torch.device, nbytes: int, repeats: int = 5) -> float:
    """GB/s of one large device-to-device tensor copy, read + write bytes over the median time."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)

    def run():
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return 2 * nbytes / timed(run, repeats=repeats)[0][0] / 1e9


def decode_bytes_per_step(model, rows: int, cache_len: float, dtype: torch.dtype) -> int:
    """Bytes one decode step reads (module docstring): the weights of the blocks, the final norm and
    the head, and the K and V of `rows` rows at `cache_len` positions, in `dtype`."""
    cfg = model.config
    weights = sum(p.numel() for m in (model.model.layers, model.model.norm, model.lm_head) for p in m.parameters())
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * rows * cfg.num_key_value_heads * head_dim * cache_len
    return round((weights + kv) * dtype.itemsize)


def sft_base(steps: int, device: torch.device) -> dict:
    """Where the default base stage's (run.py --stage base) tokens, FLOPs and time go. Over the run's
    own batches (sft.bucketed_batches, every step): real and padding tokens, learned (assistant)
    tokens; FLOPs = 6 x linear parameters x every token (forward + backward) + 6 x the head over
    learned tokens only (sft's lean loss) + attention's QK^T and AV, 12 x hidden x T^2 / 2 x layers per
    sequence (causal half, forward + backward); then `steps` SFT steps timed after 5 warm-up steps,
    and torch.mm at the stage's largest linear shapes, the rate the step should be read against."""
    import run
    import sft
    from world import build_world

    c = run.resolve_configs(run.build_parser().parse_args([]))
    world = build_world(c["world"])
    tok = data.build_tokenizer(world.texts(), c["run"].vocab_size)
    t0 = time.perf_counter()
    encoded = data.encode_chats(tok, world.corpus)
    encode_s = time.perf_counter() - t0
    lengths = [min(len(ids), c["sft"].max_len) for ids, _ in encoded]
    learned = [sum(mask[1:]) for _, mask in encoded]
    m, cfg = c["model"], c["sft"]
    kv = m.hidden * m.kv_heads // m.heads
    linear = m.layers * (2 * m.hidden * m.hidden + 2 * m.hidden * kv + 3 * m.hidden * m.intermediate)
    real = pad = head = attention = 0
    batches = sft.bucketed_batches(lengths, cfg.batch_size, cfg.seed)
    for _ in range(cfg.steps):
        batch = next(batches)
        width = max(lengths[i] for i in batch)
        real += sum(lengths[i] for i in batch)
        pad += width * len(batch) - sum(lengths[i] for i in batch)
        head += sum(learned[i] for i in batch)
        attention += 12 * m.hidden * width * width / 2 * m.layers * len(batch)
    flops = {"linear": 6 * linear * (real + pad), "head": 6 * len(tok) * m.hidden * head, "attention": attention}
    model = policy.init_tiny_model(tok, m).to(device)
    marks = []
    cfg_t = dataclasses.replace(cfg, steps=steps + 5, log_every=0, callback_every=1)
    sft.sft(model, tok, world.corpus, cfg_t, log=lambda *a: None, callback=lambda step, _: marks.append(time.perf_counter()))
    step_s = (marks[-1] - marks[5]) / steps
    tokens_per_step = (real + pad) / cfg.steps
    return {"threads": torch.get_num_threads(), "docs": len(lengths), "steps": cfg.steps,
            "real_tokens": real, "pad_tokens": pad, "pad_frac": pad / (real + pad), "learned_tokens": head,
            "learned_frac": head / real, "mean_doc_tokens": real / cfg.steps / cfg.batch_size,
            "gflop": {k: v / 1e9 for k, v in flops.items()}, "flop_frac": {k: v / sum(flops.values()) for k, v in flops.items()},
            "encode_s": encode_s, "step_s": step_s, "base_s_estimate": encode_s + step_s * cfg.steps,
            "achieved_gflops": sum(flops.values()) / cfg.steps / step_s / 1e9,
            "matmul_gflops": matmul_gflops([(int(tokens_per_step), m.hidden, m.intermediate),
                                            (int(tokens_per_step), m.intermediate, m.hidden)], device)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="a saved HF model folder (real weights, its own tokenizer) instead of a random init; "
                   "the shape flags are then ignored")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no GQA)")
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--batch", type=int, default=8, help="prompts per step (B)")
    p.add_argument("--group", type=int, default=8, help="samples per prompt (G)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=16, help="GRPO micro-batch (completions)")
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--steps", type=int, default=4, help="timed GRPO steps (after one warm-up step; 0 = no GRPO step)")
    p.add_argument("--repeats", type=int, default=5, help="timed sampler/generate calls (alternating)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default=None, help="cpu | cuda | mps (default: best available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (GPU)")
    p.add_argument("--matmul-peak", action="store_true", help="also measure torch.mm GFLOP/s at the model's shapes")
    p.add_argument("--skip-generate", action="store_true", help="skip HF model.generate")
    p.add_argument("--judge-responses", type=int, default=10_000, help="responses for the pattern-judge timing (0 = skip)")
    p.add_argument("--eval-items", type=int, default=0, help="with --model: time an eval of this many items per family of "
                   "scenarios/evals.jsonl, the model its own judge (eval_profile; 0 = skip)")
    p.add_argument("--tis", default=None, choices=["token", "sequence"],
                   help="also run the GRPO steps with the sampler/trainer mismatch correction (tis_* fields)")
    p.add_argument("--sft-base", type=int, default=0, metavar="STEPS",
                   help="instead: the default base stage's work (tokens, padding, FLOPs by part) and STEPS timed SFT steps")
    args = p.parse_args()

    device = torch.device(args.device) if args.device else policy.pick_device()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sft_base:
        print(json.dumps(sft_base(args.sft_base, device)))
        return
    if args.model:
        model, tok = policy.load_policy(args.model, device)
        model.eval()
        words = synthetic_tokenizer(args.vocab)[1]  # pseudo-words: prompts of a set length in any tokenizer
    else:
        tok, words = synthetic_tokenizer(args.vocab)
        torch.manual_seed(0)
        cfg = policy.ModelConfig(hidden=args.hidden, layers=args.layers, heads=args.heads,
                                 kv_heads=args.kv_heads or args.heads, intermediate=args.intermediate,
                                 max_positions=args.prompt_tokens + args.new_tokens + 64, tie_embeddings=False)
        model = policy.init_tiny_model(tok, cfg).to(device).eval()
    convs = make_prompts(tok, words, args.batch, args.prompt_tokens)
    prompts = [data.encode_prompt(tok, c) for c in convs]
    G, T = args.group, args.new_tokens
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def ours(new_tokens: int = T):
        ro = policy.generate(model, tok, prompts, G, new_tokens, 1.0,
                           generator=torch.Generator(device=device).manual_seed(0), compile=args.compile)
        sync()
        return ro

    ids, attn = policy.left_pad(prompts, tok.pad_token_id, device)

    def hf():
        out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0, top_k=0,
                             top_p=1.0, max_new_tokens=T, num_return_sequences=G,
                             eos_token_id=policy.stop_token_ids(tok), pad_token_id=tok.pad_token_id)
        sync()
        return out

    (sample_s, ro), *gen = timed(ours, *([] if args.skip_generate else [hf]), repeats=args.repeats)
    result = {"device": str(device), "threads": torch.get_num_threads(), "params": sum(q.numel() for q in model.parameters()),
              "vocab": len(tok),
              "batch": args.batch, "group": G, "new_tokens": T,
              "sample_s": sample_s, "sample_tokens_per_s": float(ro.mask.sum()) / sample_s}
    if gen:
        gen_s, out = gen[0]
        n_tok = int((out[:, ids.shape[1]:] != tok.pad_token_id).sum())
        result.update(generate_s=gen_s, generate_tokens_per_s=n_tok / gen_s,
                      speedup=result["sample_tokens_per_s"] / (n_tok / gen_s))

    if args.steps:  # the GRPO step (a real model on a CPU: minutes a step)
        class BenchSampler:
            def batch(self, step, n, rank=0, world=1):
                k = n // world
                return [{"prompt": convs[i]} for i in range(rank * k, (rank + 1) * k)]

        def reward(rec, texts, finished):  # cheap and varied: a fake reward must not dominate the step
            return [{"score": t.count("e") / max(len(t), 1)} for t in texts]

        gcfg = grpo.GRPOConfig(steps=args.steps + 1, prompts_per_step=args.batch, group_size=G, max_new_tokens=T,
                               beta=args.beta, micro_batch_size=args.micro_batch, checkpoint_every=0, log_every=0,
                               compile=args.compile)
        with tempfile.TemporaryDirectory() as out_dir:
            hist = grpo.train_grpo(model, tok, BenchSampler(), reward, gcfg, out_dir)
        timed_steps = hist[1:]
        result["step_s"] = statistics.median(h["perf/step_s"] for h in timed_steps)
        result["mismatch_kl"] = statistics.mean(h["mismatch/kl"] for h in timed_steps)
        result["mismatch_trunc_frac"] = statistics.mean(h["mismatch/trunc_frac"] for h in timed_steps)
        if args.tis:  # as many steps again, on the same model (its decode weights and compiled graphs), correction on
            with tempfile.TemporaryDirectory() as out_dir:
                tis_hist = grpo.train_grpo(model, tok, BenchSampler(), reward, dataclasses.replace(gcfg, tis=args.tis),
                                           out_dir)[1:]
            result["tis_mismatch_kl"] = statistics.mean(h["mismatch/kl"] for h in tis_hist)
            result["tis_trunc_frac"] = statistics.mean(h["mismatch/trunc_frac"] for h in tis_hist)
            result["tis_step_s"] = statistics.median(h["perf/step_s"] for h in tis_hist)
        for part in ("rollout", "reward", "ref", "train"):
            result[f"{part}_s"] = statistics.median(h[f"perf/{part}_s"] for h in timed_steps)

        # FLOPs of the training phase: policy fwd (2) + bwd (4) + reference fwd (2) per param per token
        head = model.lm_head.weight.numel()
        body = sum(q.numel() for q in model.parameters()) - head - model.model.embed_tokens.weight.numel()
        rows = args.batch * G
        seq = ro.prompt_ids.shape[1] + statistics.median(h["len/mean"] for h in timed_steps)
        completion = statistics.median(h["len/mean"] for h in timed_steps) + 1
        flops = 8 * rows * (body * seq + head * completion)
        result["train_gflops"] = flops / result["train_s"] / 1e9
        if args.matmul_peak:
            m = args.micro_batch * int(seq)
            h, i, kv = args.hidden, args.intermediate, (args.kv_heads or args.heads) * (args.hidden // args.heads)
            shapes = [(m, h, h), (m, h, kv), (m, h, kv), (m, h, h), (m, h, i), (m, h, i), (m, i, h)]
            result["matmul_gflops"] = matmul_gflops(shapes, device)
            result["train_frac_of_matmul"] = result["train_gflops"] / result["matmul_gflops"]

    # the sampler call with one new token: the prefill and the first sample, no decode step
    prefill_s = timed(lambda: ours(1), repeats=args.repeats)[0][0]
    decode_steps = ro.completion.shape[1] - 1  # the first token comes from the prefill's logits
    with policy.autocast(device):  # the dtype the decode reads weights and cache in
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else model.dtype
    cache_len = float(ro.prompt_mask.sum(1).float().mean()) + (decode_steps + 1) / 2
    result["decode_bytes_per_token_step"] = decode_bytes_per_step(model, ro.completion.shape[0], cache_len, dtype)
    result["decode_bw_gbs"] = result["decode_bytes_per_token_step"] * decode_steps / (sample_s - prefill_s) / 1e9
    result["peak_bw_gbs"] = copy_bandwidth_gbs(device, 2 ** 28 if device.type == "cpu" else 2 ** 30)
    result["bw_frac"] = result["decode_bw_gbs"] / result["peak_bw_gbs"]
    if device.type == "cuda":
        result["spec_bw_gbs"] = SPEC_BW_GBS.get(torch.cuda.get_device_name(device))
    if args.judge_responses:
        result["judge_s_per_10k"] = 1e4 / judge_responses_per_s(args.judge_responses)
    if args.eval_items and args.model:
        result.update(eval_profile(model, tok, args.eval_items, T, args.repeats))
    # 4 decimals, but 4 significant digits for the KLs (~1e-7 .. 1e-3)
    print(json.dumps({k: (float(f"{v:.4g}") if k.endswith("mismatch_kl") else round(v, 4)) if isinstance(v, float) else v
                      for k, v in result.items()}))


if __name__ == "__main__":
    main()
