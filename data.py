"""data.py - records, tokenizer and the RL prompt sampler: what every other file reads data through.

What it does, in execution order:
  1. Errors a user can cause (`UserError`, `DataError`), caught by run.py: one line, exit code 2.
  2. The record schema and its validation; loaders for JSONL files and HF datasets. A real
     HealthBench line (`prompt`, `rubrics`, `prompt_id`, `example_tags`) loads unchanged; GSM8K rows
     (`question`, `answer` ending "#### 42") load as task records (`load_gsm8k`).
  3. The tokenizer: a byte-level BPE trained with `tokenizers` on the world's corpus, role special
     tokens and a Jinja chat template, saved as a transformers tokenizer so `apply_chat_template`
     works exactly as on a hub model. `encode_chat` gives the assistant-only loss mask for any
     chat template.
  4. The mixed sampler: prompt groups drawn with a trait fraction and domain filters,
     deterministic in (seed, step), sharded by whole groups across ranks.
The tiny world that fills these records is world.py.

Record schema (one JSON object per line):
  {"id": "trait/honesty/health/017", "kind": "trait" | "task" | "eval",
   "trait": ..., "domain": ..., "family": ..., "split": "train" | "heldout_topic" | ...,
   "prompt": [{"role": "system" | "user" | "assistant", "content": "..."}, ...],
   "rubrics": [{"criterion": "...", "points": 5, "tags": [...],
                "match": {"any": [regex, ...], "none": [regex, ...]}}, ...],
   "answer": "..."  (tasks), "grader": {...} (evals: what the family's grader reads)}
`match` is read by the pattern judge only; an LLM judge reads `criterion`.
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterable, Iterator

import numpy as np

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


def validate_messages(messages: object, where: str, name: str = "messages") -> list[dict]:
    """A non-empty list of {'role', 'content'} chat messages, or DataError."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: '{name}' must be a non-empty list of messages")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ROLES or not isinstance(msg.get("content"), str):
            raise DataError(f"{where}: {name}[{i}] must be {{'role': one of {ROLES}, 'content': str}}")
    return messages


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
    prompt = validate_messages(rec["prompt"], where, "prompt")
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
                if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
                    raise DataError(f"{where}: rubrics[{i}].match.{key} must be a list of regex strings")
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


def read_jsonl(path: str) -> Iterator[tuple[str, object]]:
    """(`path:line`, parsed object) per non-blank line; DataError on a missing file or bad JSON.
    Every JSONL reader of the project goes through here, so errors always name file and line."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{line_no}", json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None


def load_jsonl(path: str) -> list[dict]:
    """Read and validate a JSONL file of records; a bad line fails with `path:line: reason`."""
    records = [validate_record(obj, where) for where, obj in read_jsonl(path)]
    if not records:
        raise DataError(f"{path}: no records")
    return records


def load_records(source: str, split: str = "train") -> list[dict]:
    """Records from a JSONL path, or from a HF dataset name (`name` or `name:split`) for users with
    internet. Every record is validated either way."""
    if source.endswith(".jsonl") or os.path.exists(source):
        return load_jsonl(source)
    name, _, name_split = source.partition(":")
    rows = dataset_rows(source, name, None, name_split or split)
    return [validate_record(row, f"{source}[{i}]") for i, row in enumerate(rows)]


def dataset_rows(source: str, name: str, config: str | None, split: str) -> list[dict]:
    """The rows of a HF dataset (`datasets.load_dataset(name, config, split=split)`); any failure is a
    DataError naming `source`, what the user typed."""
    try:
        import datasets

        return list(datasets.load_dataset(name, config, split=split))
    except Exception as e:  # a hub error is a user error here: wrong name, no network, no access
        raise DataError(f"{source}: cannot load as a file or a HF dataset ({type(e).__name__}: {e})") from None


# GSM8K's instruction. reward.task_reward accepts the bare answer or "Answer: N" and nothing around
# it (a verifier that searched the text would reward listing candidates), so the prompt asks for the
# final answer only: a worked solution before "Answer: N" would score 0.
GSM8K_INSTRUCTION = "Reply with the final answer only, in the form 'Answer: N'."


def load_gsm8k(source: str) -> list[dict]:
    """GSM8K-format math word problems (Cobbe et al. 2021, arXiv:2110.14168) as task records.

    `source` is a JSONL path or a HF dataset `NAME:CONFIG[:SPLIT]` ("openai/gsm8k:main",
    "openai/gsm8k:main:test"; the split defaults to train). Each row has a `question` and an
    `answer`, the worked solution ending in "#### 42". A record (kind "task", family "gsm8k") asks
    the question plus GSM8K_INSTRUCTION; its answer is the number after "####" without thousands
    commas ("1,234" -> "1234"), which reward.task_reward compares as a number ("Answer: 1234",
    "1234.0"). A bad row fails with `path:line: reason`.
    """
    if source.endswith(".jsonl") or os.path.exists(source):
        rows, split = read_jsonl(source), "train"
    else:
        name, _, rest = source.partition(":")
        config, _, split = rest.partition(":")
        split = split or "train"
        rows = ((f"{source}[{i}]", row) for i, row in enumerate(dataset_rows(source, name, config or None, split)))
    records = []
    for where, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
            raise DataError(f"{where}: a GSM8K row needs string fields 'question' and 'answer'")
        _, sep, final = row["answer"].rpartition("####")
        answer = final.strip().replace(",", "")
        if not sep or not answer:
            raise DataError(f"{where}: 'answer' must end with '#### <final answer>'")
        prompt = [{"role": "user", "content": f"{row['question'].strip()}\n\n{GSM8K_INSTRUCTION}"}]
        records.append(validate_record({"id": f"gsm8k/{split}/{len(records):05d}", "kind": "task", "family": "gsm8k",
                                        "split": split, "prompt": prompt, "answer": answer}, where))
    if not records:
        raise DataError(f"{source}: no records")
    return records


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
# An assistant turn's content and end-of-turn marker sit in a {% generation %} block: HF then returns
# the loss mask with the ids (return_assistant_tokens_mask), one render per conversation.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|assistant|>' }}"
    "{% generation %}{{ m['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


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


def encode_chats(tokenizer, conversations: list[list[dict]]) -> list[tuple[list[int], list[int]]]:
    """Ids of each whole conversation and a loss mask that is 1 on assistant content and on the
    end-of-turn token that closes it.

    A template that marks assistant turns with {% generation %} (ours, and some hub models') renders
    all conversations in one batched call and HF returns the masks (the base's 40,000 documents: ~2x
    faster than one call each). Any other template works by rendering prefixes as text, one
    conversation at a time (`_encode_by_prefixes`).
    """
    if conversations and _GENERATION_TAG.search(tokenizer.chat_template or ""):
        enc = tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        return [(list(ids), list(mask)) for ids, mask in zip(enc["input_ids"], enc["assistant_masks"], strict=True)]
    return [_encode_by_prefixes(tokenizer, conv) for conv in conversations]


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """encode_chats of one conversation: its ids and assistant-only loss mask."""
    return encode_chats(tokenizer, [messages])[0]


def _encode_by_prefixes(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """The mask for a template without {% generation %}: the span an assistant turn adds is
    text[len(render(msgs[:i], generation prompt)) : len(render(msgs[:i+1]))], cut after the special
    token that ends the reply (ChatML's "<|im_end|>", not the newline after it), and a token belongs
    to it when its character offset falls inside. (Diffing token ids of prefixes would break on
    templates whose BPE merges across a turn boundary.)"""
    render = lambda msgs, gen: tokenizer.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
    text = render(messages, False)
    specials = sorted(tokenizer.all_special_tokens, key=len, reverse=True)  # longest first: no prefix of a longer one
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] == "assistant":
            # an opening assistant turn has no prefix to render (templates reject an empty list):
            # its span starts where its content does
            start = len(render(messages[:i], True)) if i else text.index(msg["content"])
            end = len(render(messages[: i + 1], False))
            # the turn ends at its end-of-turn token: text a template adds after it (ChatML's "\n")
            # is the next turn's opening, not the assistant's to learn
            content_end = text.find(msg["content"], start, end) + len(msg["content"])
            marker = next((t for t in specials if text.startswith(t, content_end)), None)
            if msg["content"] in text[start:end] and marker is not None:
                end = content_end + len(marker)
            spans.append((start, end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(a <= s < b for a, b in spans)) for s, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


# ----------------------------------------------------------------------------------------------
# 4. The mixed sampler
# ----------------------------------------------------------------------------------------------


class MixedSampler:
    """RL prompts: each prompt is a trait scenario with probability `trait_fraction`, else a
    standard task. Batch `step` is a pure function of (seed, step), so resuming needs only the step,
    and every rank can draw the same global batch and keep its own contiguous share of whole groups.

    Domain filters apply to trait prompts only (tasks have no domain): `include` keeps only those
    domains (the health-only ablation), `exclude` drops them (the no-health/science ablation).
    """

    def __init__(self, trait_records: list[dict], task_records: list[dict], trait_fraction: float, seed: int = 0,
                 include: Iterable[str] = (), exclude: Iterable[str] = ()):
        include, exclude = set(include), set(exclude)
        self.traits = [r for r in trait_records if (not include or r.get("domain") in include)
                       and r.get("domain") not in exclude]
        self.tasks = list(task_records)
        self.trait_fraction, self.seed = trait_fraction, seed
        if trait_fraction > 0 and not self.traits:
            raise UserError(f"no trait prompts left after the domain filters include={sorted(include)} exclude={sorted(exclude)}")
        if trait_fraction < 1 and not self.tasks:
            raise UserError("trait_fraction < 1 needs standard task prompts")

    def batch(self, step: int, n_prompts: int, rank: int = 0, world_size: int = 1) -> list[dict]:
        if n_prompts % world_size:
            raise UserError(f"prompts per step ({n_prompts}) must be divisible by the number of ranks ({world_size})")
        rng = np.random.default_rng([self.seed, step])
        is_trait = rng.random(n_prompts) < self.trait_fraction
        trait_idx = rng.integers(0, max(len(self.traits), 1), size=n_prompts)
        task_idx = rng.integers(0, max(len(self.tasks), 1), size=n_prompts)
        batch = [self.traits[t] if flag else self.tasks[k] for flag, t, k in zip(is_trait, trait_idx, task_idx)]
        share = n_prompts // world_size
        return batch[rank * share:(rank + 1) * share]
