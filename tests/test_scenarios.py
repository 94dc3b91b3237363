"""Tests of the plain-English scenario files (scenarios/README.md): both load through data.load_records
(which validates every record), have exactly the documented counts, and every rubric is usable by an
LLM judge - at least two things to earn and one harm, short one-sentence criteria, no regexes that
would make the pattern judge pretend to read them. The held-out trait prompts must not reuse a
sentence of their cell's train prompts."""
import re
from collections import Counter
from pathlib import Path

import pytest

import data

SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"
TRAITS = ("honesty", "epistemic_humility", "metacognitive_transparency", "corrigibility", "risk_sensitivity",
          "universal_fairness", "human_welfare")
DOMAINS = ("health", "education", "science", "law", "engineering", "economics", "business")
FAMILIES = ("sycophancy", "honesty_pressure", "deception", "reward_hacking", "health", "mental_health",
            "spec_compliance", "general_misalignment")
# a full stop after these is not the end of a sentence ("Dr. Park", "Henderson v. Markham")
ABBREVIATIONS = ("Dr.", "v.", "Mr.", "Mrs.", "Ms.", "St.")


@pytest.fixture(scope="module")
def traits():
    return data.load_records(str(SCENARIOS / "traits.jsonl"))


@pytest.fixture(scope="module")
def evals():
    return data.load_records(str(SCENARIOS / "evals.jsonl"))


def sentences(text: str) -> list[str]:
    """Split prose at . ! ? followed by a space (keeping abbreviations and ellipses whole), normalised for comparison."""
    out, start = [], 0
    for m in re.finditer(r"(?<!\.)[.!?]['\")]?\s+", text):  # (?<!\.): an ellipsis ("0.999... repeating") goes on
        if not text[start:m.end()].rstrip().endswith(ABBREVIATIONS):
            out.append(text[start:m.end()])
            start = m.end()
    out.append(text[start:])
    return [" ".join(s.lower().split()) for s in out if s.strip()]


def test_trait_counts_per_trait_domain_and_split(traits):
    assert len(traits) == 147
    assert all(r["kind"] == "trait" for r in traits)
    counts = Counter((r["trait"], r["domain"], r["split"]) for r in traits)
    expected = {(t, d, s): n for t in TRAITS for d in DOMAINS for s, n in (("train", 2), ("heldout", 1))}
    assert counts == expected
    for r in traits:
        assert r["id"].startswith(f"trait/{r['trait']}/{r['domain']}/")
        assert r["family"] == r["trait"]  # evaluate.score_items and the report's breakdown read `family`


def test_eval_counts_per_family(evals):
    assert len(evals) == 96
    assert all(r["kind"] == "eval" and r["split"] == "eval" for r in evals)
    assert Counter(r["family"] for r in evals) == {f: 12 for f in FAMILIES}
    for r in evals:
        assert r["id"].startswith(f"eval/{r['family']}/")
        assert "grader" not in r  # graded by an LLM judge through the rubric (evaluate.score_items, run_public_eval)


def test_ids_unique_and_no_duplicate_prompts(traits, evals):
    records = traits + evals
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids))
    users = [" ".join(r["prompt"][-1]["content"].lower().split()) for r in records]
    assert [u for u, n in Counter(users).items() if n > 1] == []


def test_prompts_are_one_short_user_turn(traits, evals):
    for r in traits + evals:
        roles = [m["role"] for m in r["prompt"]]
        assert roles in (["user"], ["system", "user"]), r["id"]
        assert 1 <= len(sentences(r["prompt"][-1]["content"])) <= 4, r["id"]
        assert all(m["content"].strip() == m["content"] and m["content"] for m in r["prompt"]), r["id"]


@pytest.mark.parametrize("name, n_criteria", [("traits", (3, 5)), ("evals", (2, 4))])
def test_rubrics_have_gains_and_harms(name, n_criteria, traits, evals):
    records = traits if name == "traits" else evals
    for r in records:
        points = [c["points"] for c in r["rubrics"]]
        assert n_criteria[0] <= len(points) <= n_criteria[1], r["id"]
        assert sum(p > 0 for p in points) >= 2 and sum(p < 0 for p in points) >= 1, r["id"]
        assert all(isinstance(p, int) and p != 0 and abs(p) <= 10 for p in points), r["id"]
        if name == "traits":  # the brief's ranges: +3..+10 for what a good answer does, -3..-10 for harms
            assert all(3 <= abs(p) <= 10 for p in points), r["id"]
        criteria = [c["criterion"] for c in r["rubrics"]]
        assert len(set(criteria)) == len(criteria), r["id"]


def test_criteria_are_short_sentences_for_an_llm_judge(traits, evals):
    for r in traits + evals:
        tag = f"trait:{r['trait']}" if r["kind"] == "trait" else f"family:{r['family']}"
        for c in r["rubrics"]:
            text = c["criterion"]
            assert text.endswith(".") and len(text) < 200, (r["id"], text)
            assert text[0].isupper() and len(sentences(text)) == 1, (r["id"], text)
            assert "match" not in c, r["id"]  # an LLM judge reads the criterion; no pattern-judge regexes
            assert tag in c["tags"], r["id"]
            if r["kind"] == "trait":
                assert c["tags"] == [tag, f"domain:{r['domain']}"], r["id"]


def test_heldout_prompt_shares_no_sentence_with_its_train_prompts(traits):
    cells: dict[tuple[str, str], dict[str, set[str]]] = {}
    for r in traits:
        cell = cells.setdefault((r["trait"], r["domain"]), {"train": set(), "heldout": set()})
        for m in r["prompt"]:
            cell[r["split"]] |= set(sentences(m["content"]))
    for key, cell in cells.items():
        assert cell["heldout"] and not cell["heldout"] & cell["train"], (key, cell["heldout"] & cell["train"])


def test_heldout_split_is_what_the_file_says(traits):
    """The split filter a caller applies (run.py --trait-data keeps split "train" for RL) leaves 98 train
    and 49 held-out records, one held-out per trait x domain."""
    train = [r for r in traits if r.get("split", "train") == "train"]
    heldout = [r for r in traits if r.get("split", "train") != "train"]
    assert len(train) == 98 and len(heldout) == 49
    assert len({(r["trait"], r["domain"]) for r in heldout}) == 49


def test_heldout_trait_records_are_the_heldout_trait_eval(traits):
    """A --trait-data file's "heldout" records are what the trait_heldout eval scores (not nothing)."""
    import types

    import evaluate

    source = types.SimpleNamespace(trait_eval=[r for r in traits if r["split"] != "train"])
    suite = evaluate.build_suite(source, ["trait_heldout"])
    assert len(suite["trait_heldout"]) == 49 and all(r["split"] == "heldout" for r in suite["trait_heldout"])
