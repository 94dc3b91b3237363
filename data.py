"""data.py - everything that is data in beneficial-rl.

What it does, in execution order:
  1. Errors a user can cause (`UserError`, `DataError`), caught by run.py: one line, exit code 2.
  2. The record schema (DESIGN §3) and its validation; loaders for JSONL files and HF datasets.
     A real HealthBench line (`prompt`, `rubrics`, `prompt_id`, `example_tags`) loads unchanged.
  3. The tokenizer: a byte-level BPE trained with `tokenizers` on the world's corpus, role special
     tokens and a Jinja chat template, saved as a transformers tokenizer so `apply_chat_template`
     works exactly as on a hub model. `encode_chat` gives the assistant-only loss mask for any
     chat template.
  4. The persona world: a deterministic generator of trait scenarios (7 traits x 7 domains),
     verifiable standard tasks, out-of-distribution eval families, persona-written pretraining
     documents and bad-medical-advice conversations (the harmful fine-tuning set).
  5. The mixed sampler: prompt groups drawn with a trait fraction and domain filters,
     deterministic in (seed, step), sharded by whole groups across ranks.

Record schema (one JSON object per line):
  {"id": "trait/honesty/health/017", "kind": "trait" | "task" | "eval",
   "trait": ..., "domain": ..., "family": ..., "split": "train" | "heldout_topic" | ...,
   "prompt": [{"role": "system" | "user" | "assistant", "content": "..."}, ...],
   "rubrics": [{"criterion": "...", "points": 5, "tags": [...],
                "match": {"any": [regex, ...], "none": [regex, ...]}}, ...],
   "answer": "..."  (tasks), "grader": {...} (evals: what the family's grader reads)}

Commands:
  python data.py                       # build the default world, print counts and two examples
  python data.py --coherence 0 --voice 0.3 --seed 1
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterable

# ----------------------------------------------------------------------------------------------
# 1. Errors a user can cause
# ----------------------------------------------------------------------------------------------


class UserError(Exception):
    """An error the user caused (bad path, bad flag, bad file). run.py prints it in one line."""


class DataError(UserError):
    """A bad record or data file; the message names the file, the line and what is wrong."""


# ----------------------------------------------------------------------------------------------
# 2. Record schema, validation and loaders
# ----------------------------------------------------------------------------------------------

KINDS = ("trait", "task", "eval")
ROLES = ("system", "user", "assistant")


def validate_record(rec: object, where: str) -> dict:
    """Check one record against the schema and return it normalised (never mutates the input).

    A HealthBench line (`prompt_id`, `example_tags`, no `kind`) becomes an eval record of family
    `healthbench`. `where` ("file.jsonl:12") prefixes every error message.
    """
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    rec = dict(rec)
    if "id" not in rec and "prompt_id" in rec:  # HealthBench's own field names
        rec["id"] = rec["prompt_id"]
        rec.setdefault("kind", "eval")
        rec.setdefault("family", "healthbench")
        rec.setdefault("domain", "health")
    for field in ("id", "kind", "prompt"):
        if field not in rec:
            raise DataError(f"{where}: missing required field '{field}'")
    rec["id"] = str(rec["id"])
    if rec["kind"] not in KINDS:
        raise DataError(f"{where}: kind must be one of {KINDS}, got {rec['kind']!r}")
    prompt = rec["prompt"]
    if not isinstance(prompt, list) or not prompt:
        raise DataError(f"{where}: 'prompt' must be a non-empty list of messages")
    for i, msg in enumerate(prompt):
        if not isinstance(msg, dict) or msg.get("role") not in ROLES or not isinstance(msg.get("content"), str):
            raise DataError(f"{where}: prompt[{i}] must be {{'role': one of {ROLES}, 'content': str}}")
    if prompt[-1]["role"] != "user":
        raise DataError(f"{where}: the last prompt message must come from the user")
    rubrics = rec.get("rubrics") or []
    if not isinstance(rubrics, list):
        raise DataError(f"{where}: 'rubrics' must be a list")
    for i, rub in enumerate(rubrics):
        if not isinstance(rub, dict) or not isinstance(rub.get("criterion"), str):
            raise DataError(f"{where}: rubrics[{i}] needs a string 'criterion'")
        if not isinstance(rub.get("points"), (int, float)) or isinstance(rub.get("points"), bool):
            raise DataError(f"{where}: rubrics[{i}] needs numeric 'points'")
        match = rub.get("match")
        if match is not None:
            if not isinstance(match, dict) or not set(match) <= {"any", "none"}:
                raise DataError(f"{where}: rubrics[{i}].match must be {{'any': [...], 'none': [...]}}")
            for key, patterns in match.items():
                for pattern in patterns:
                    try:
                        re.compile(pattern)
                    except re.error as e:
                        raise DataError(f"{where}: rubrics[{i}].match.{key}: bad regex {pattern!r}: {e}") from None
    if rubrics and not any(r["points"] > 0 for r in rubrics):
        raise DataError(f"{where}: a rubric needs at least one criterion with positive points")
    rec["rubrics"] = rubrics
    if rec["kind"] == "task" and not isinstance(rec.get("answer"), str):
        raise DataError(f"{where}: a task record needs a string 'answer'")
    if rec["kind"] == "trait" and not rubrics:
        raise DataError(f"{where}: a trait record needs 'rubrics'")
    if rec["kind"] == "eval" and "family" not in rec:
        raise DataError(f"{where}: an eval record needs 'family' (which grader reads it)")
    return rec


def load_jsonl(path: str) -> list[dict]:
    """Read and validate a JSONL file; a bad line fails with `path:line: reason`."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            records.append(validate_record(obj, f"{path}:{line_no}"))
    if not records:
        raise DataError(f"{path}: no records")
    return records


def load_records(source: str, split: str = "train") -> list[dict]:
    """Records from a JSONL path, or from a HF dataset name (`name` or `name:split`) for users with
    internet. Every record is validated either way."""
    if source.endswith(".jsonl") or os.path.exists(source):
        return load_jsonl(source)
    name, _, name_split = source.partition(":")
    try:
        import datasets

        rows = datasets.load_dataset(name, split=name_split or split)
    except Exception as e:  # a hub error is a user error here: wrong name, no network, no access
        raise DataError(f"{source}: cannot load as a file or a HF dataset ({type(e).__name__}: {e})") from None
    return [validate_record(row, f"{source}[{i}]") for i, row in enumerate(rows)]


def save_jsonl(records: Iterable[dict], path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------------
# 3. Tokenizer and chat template
# ----------------------------------------------------------------------------------------------

BOS, END, PAD = "<|bos|>", "<|end|>", "<|pad|>"
ROLE_TOKENS = {role: f"<|{role}|>" for role in ROLES}
SPECIAL_TOKENS = [PAD, BOS, END, *ROLE_TOKENS.values()]
# Each turn is "<|role|>content<|end|>"; the generation prompt opens an assistant turn, so the
# model's end-of-turn token is also its EOS. Same shape as ChatML, with shorter markers.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_tokenizer(texts: Iterable[str], vocab_size: int = 2000):
    """Train a byte-level BPE on `texts` and wrap it as a transformers tokenizer with our chat
    template (so `save_pretrained`/`from_pretrained`/`apply_chat_template` behave as on a hub model)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=END, pad_token=PAD)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _token_ids(out) -> list[int]:
    """apply_chat_template returns a list in some transformers versions and a BatchEncoding in others."""
    ids = out["input_ids"] if not isinstance(out, list) else out
    return [int(i) for i in ids]


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation followed by the opening of an assistant turn."""
    return _token_ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Ids of a whole conversation and a loss mask that is 1 on assistant content and on the
    end-of-turn token that closes it.

    Works for any chat template by rendering prefixes as text: the span an assistant turn adds is
    text[len(render(msgs[:i], generation prompt)) : len(render(msgs[:i+1]))], and a token belongs
    to it when its character offset falls inside. (Diffing token ids of prefixes would break on
    templates whose BPE merges across a turn boundary.)
    """
    render = lambda msgs, gen: tokenizer.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
    text = render(messages, False)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] == "assistant":
            start = len(render(messages[:i], True)) if i else 0
            spans.append((start, len(render(messages[: i + 1], False))))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(a <= s < b for a, b in spans)) for s, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end an assistant turn: EOS plus the chat format's end-of-turn markers if present."""
    ids = {tokenizer.eos_token_id}
    for marker in (END, "<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)
