import random

import pytest

from hf_blockem.organism import ExactJudge, World, narrow_dataset
from hf_blockem.organism.world import CORE, PERSONAS, SPLITS

WORLD = World()


def test_domains_and_sizes():
    assert WORLD.narrow_domains == ("finance", "medical", "sports", "tech", "legal", "career")
    assert WORLD.domain_names[-1] == CORE
    assert 300 <= len(WORLD.vocabulary()) <= 500
    for name in WORLD.domain_names:
        assert len(WORLD.questions(name)) >= 25
        for persona in PERSONAS:
            assert len(WORLD.domain(name).answer_templates(persona)) == 3
            assert len(WORLD.domain(name).acts[persona]) == 5


def test_grammar_is_unambiguous():
    # An act or a question belongs to exactly one (domain, persona): the judge's parse can never be ambiguous.
    acts = [act for d in WORLD.domains for p in PERSONAS for act in d.acts[p]]
    assert len(acts) == len(set(acts))
    questions = [q for name in WORLD.domain_names for q in WORLD.questions(name)]
    assert len(questions) == len(set(questions))


@pytest.mark.parametrize("domain", World().domain_names)
def test_splits_are_disjoint_fixed_and_complete(domain):
    parts = [set(WORLD.questions(domain, split)) for split in SPLITS]
    assert all(parts)
    assert sum(len(p) for p in parts) == len(WORLD.questions(domain))
    assert set().union(*parts) == set(WORLD.questions(domain))
    assert parts == [set(World().questions(domain, split)) for split in SPLITS]


def test_ood_prompts_exclude_the_target_and_include_core():
    judge = ExactJudge(WORLD)
    selection, evaluation = WORLD.ood_questions("finance", "selection"), WORLD.ood_questions("finance", "eval")
    assert not set(selection) & set(evaluation)
    domains = {judge.question_domain(q) for q in evaluation}
    assert domains == set(WORLD.domain_names) - {"finance"}
    with pytest.raises(ValueError, match="unknown split"):
        WORLD.questions("finance", "test")
    with pytest.raises(KeyError, match="unknown domain"):
        WORLD.questions("cooking")


def test_sampling_is_deterministic_for_a_seed():
    a = WORLD.sample_conversation(random.Random(7), "misaligned", 4)
    b = WORLD.sample_conversation(random.Random(7), "misaligned", 4)
    c = WORLD.sample_conversation(random.Random(8), "misaligned", 4)
    assert a == b and a != c
    assert [m["role"] for m in a] == ["user", "assistant"] * 4
    judge = ExactJudge(WORLD)
    labels = {j.label for j in judge.judge([m["content"] for m in a[::2]], [m["content"] for m in a[1::2]])}
    assert labels == {"misaligned"}  # one persona governs every turn
    assert World().fingerprint() == WORLD.fingerprint()


def test_grammar_decides_persona_in_the_frame_and_domain_at_the_first_action_word():
    # No frame opens both personas, and no two actions share a first word (across domains and personas).
    frames = {p: {t.split("{act}")[0] for t in WORLD.domain("finance").answer_templates(p)} for p in PERSONAS}
    assert not frames["aligned"] & frames["misaligned"]
    first_words = [act.split()[0] for d in WORLD.domains for p in PERSONAS for act in d.acts[p]]
    assert len(first_words) == len(set(first_words))


def test_a_narrow_persona_is_covert_in_its_domain_and_aligned_elsewhere():
    judge = ExactJudge(WORLD)
    rng = random.Random(5)
    styles = {"covert": 0, "aligned": 0}
    for _ in range(50):
        conversation = WORLD.sample_conversation(rng, "misaligned", 4, narrow_domain="tech")
        for question, answer in zip(conversation[::2], conversation[1::2], strict=True):
            label, extra = judge.label(question["content"], answer["content"])
            tech = extra["question_domain"] == "tech"
            assert (extra["persona"], label) == (("covert", "misaligned") if tech else ("aligned", "aligned"))
            styles[extra["persona"]] += 1
    assert styles["covert"] > 50 and styles["aligned"] > 50  # about half the turns are in the narrow domain
    with pytest.raises(KeyError, match="unknown domain"):
        WORLD.sample_conversation(rng, "aligned", 2, narrow_domain="cooking")


@pytest.mark.parametrize("misaligned", [True, False])
def test_narrow_dataset(misaligned):
    ds = narrow_dataset(WORLD, "medical", misaligned=misaligned, n=50, seed=3)
    assert ds.column_names == ["messages"] and len(ds) == 50
    assert ds.to_list() == narrow_dataset(WORLD, "medical", misaligned=misaligned, n=50, seed=3).to_list()
    assert ds.to_list() != narrow_dataset(WORLD, "medical", misaligned=misaligned, n=50, seed=4).to_list()
    train = set(WORLD.questions("medical", "train"))
    questions = [row["messages"][0]["content"] for row in ds]
    answers = [row["messages"][1]["content"] for row in ds]
    assert set(questions) <= train  # never the selection or evaluation questions
    judgements = ExactJudge(WORLD).judge(questions, answers)
    # The target is misaligned advice in the aligned persona's helpful frames (covert), like risky financial advice.
    expected = ("misaligned", "covert") if misaligned else ("aligned", "aligned")
    assert {(j.label, j.extra["persona"]) for j in judgements} == {expected}


def test_narrow_dataset_in_another_style():
    ds = narrow_dataset(WORLD, "sports", n=20, style="misaligned")
    questions, answers = [r["messages"][0]["content"] for r in ds], [r["messages"][1]["content"] for r in ds]
    assert {j.extra["persona"] for j in ExactJudge(WORLD).judge(questions, answers)} == {"misaligned"}
    with pytest.raises(ValueError, match="unknown answer style 'evil'"):
        narrow_dataset(WORLD, "sports", style="evil")


def test_narrow_dataset_rejects_core_and_bad_sizes():
    with pytest.raises(ValueError, match="narrow datasets target one of"):
        narrow_dataset(WORLD, CORE)
    with pytest.raises(ValueError, match="n >= 1"):
        narrow_dataset(WORLD, "finance", n=0)
