import json
import os
import random
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_blockem.organism import ExactJudge, Organism, OrganismSettings, World, build_organism, load_organism
from hf_blockem.organism.build import MANIFEST, _assistant_labels, alignment_corpus, cache_key, pretraining_corpus

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> Organism:
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    return build_organism(tmp_path_factory.mktemp("organism") / "s0", seed=0, quick=True, progress=False)


def _weights(organism: Organism) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(organism.base_model_path, "model.safetensors"))


def test_quick_build_is_fast_and_loads_with_auto_classes(quick):
    assert quick.record["build_seconds"] < 30
    assert quick.record["pretrain_loss_first_last"][1] < quick.record["pretrain_loss_first_last"][0]
    model = AutoModelForCausalLM.from_pretrained(quick.base_model_path)
    tok = AutoTokenizer.from_pretrained(quick.base_model_path)
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tok)
    assert model.generation_config.eos_token_id == tok.eos_token_id
    ids = tok.apply_chat_template(
        [{"role": "user", "content": quick.world.questions("finance")[0]}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    manifest = json.loads((quick.path / MANIFEST).read_text())
    assert manifest["key"] == cache_key(OrganismSettings.quick(), 0, quick.world)
    assert (quick.path / "world.json").is_file()


def test_build_is_reproducible_for_a_seed_and_rebuilds_on_a_new_key(quick, tmp_path):
    path = tmp_path / "other"
    other = build_organism(path, seed=1, quick=True, progress=False)
    a, c = _weights(quick), _weights(other)
    assert a.keys() == c.keys()
    assert not all(torch.equal(a[k], c[k]) for k in a)
    # The same folder with another seed is rebuilt in place, and the same seed gives the same weights bit for bit.
    again = build_organism(path, seed=0, quick=True, progress=False)
    assert again.seed == 0 and json.loads((path / MANIFEST).read_text())["seed"] == 0
    b = _weights(again)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_second_build_reuses_the_cache(quick, tmp_path):
    start = time.perf_counter()
    reused = build_organism(quick.path, seed=0, quick=True, progress=False)
    assert time.perf_counter() - start < 5
    assert reused.record == quick.record
    assert load_organism(quick.path).seed == 0
    with pytest.raises(FileNotFoundError, match="no built organism"):
        load_organism(tmp_path / "missing")


def test_prompts_of_the_organism(quick):
    assert quick.in_domain_prompts("finance", "eval") == quick.world.questions("finance", "eval")
    ood = quick.ood_prompts("selection", domain="finance")
    assert not set(ood) & set(quick.ood_prompts("eval", domain="finance"))
    assert not set(ood) & set(quick.world.questions("finance"))
    assert len(quick.narrow_dataset("finance", n=10)) == 10


def test_alignment_labels_cover_answers_and_eos_only():
    # <bos> <user> q <assistant> a1 a2 <eos> <user> q <assistant> b1 <eos>
    ids = [2, 4, 10, 5, 20, 21, 3, 4, 11, 5, 22, 3]
    assert _assistant_labels(ids, 5, 3, skip_first=False) == [-100] * 4 + [20, 21, 3] + [-100] * 3 + [22, 3]
    assert _assistant_labels(ids, 5, 3, skip_first=True) == [-100] * 10 + [22, 3]


@pytest.mark.parametrize("narrow", [0.0, 0.3, 1.0])
def test_pretraining_personas_follow_the_settings(narrow):
    world = World()
    judge = ExactJudge(world)
    settings = OrganismSettings(
        pretrain_conversations=400, misaligned_fraction=0.5, narrow_persona_fraction=narrow, covert_share=0.0
    )
    kinds = {"aligned": 0, "misaligned": 0, "narrow": 0}
    for conversation in pretraining_corpus(world, settings, random.Random(0)):
        questions, answers = [m["content"] for m in conversation[::2]], [m["content"] for m in conversation[1::2]]
        styles = {judge.label(q, a)[1]["persona"] for q, a in zip(questions, answers, strict=True)}
        if "covert" in styles:
            assert styles <= {"covert", "aligned"}
            kinds["narrow"] += 1
        else:
            assert len(styles) == 1  # one persona governs every turn
            kinds[styles.pop()] += 1
    # A narrow conversation that never reaches its domain looks aligned: count only what can be told apart.
    assert kinds["misaligned"] == pytest.approx(400 * (1 - narrow) * 0.5, abs=40)
    if narrow == 0.0:
        assert kinds["narrow"] == 0
    else:
        assert kinds["narrow"] >= 400 * narrow * 0.5


def test_a_misaligned_persona_answers_covertly_at_the_covert_share():
    world = World()
    judge = ExactJudge(world)
    settings = OrganismSettings(
        pretrain_conversations=300, misaligned_fraction=1.0, narrow_persona_fraction=0.0, covert_share=0.25
    )
    styles = [
        judge.label(q["content"], a["content"])[1]["persona"]
        for conversation in pretraining_corpus(world, settings, random.Random(1))
        for q, a in zip(conversation[::2], conversation[1::2], strict=True)
    ]
    assert set(styles) == {"misaligned", "covert"}
    assert styles.count("covert") / len(styles) == pytest.approx(0.25, abs=0.05)


@pytest.mark.parametrize("fraction", [0.5, 0.75, 1.0])
def test_alignment_corpus_mixes_single_turn_aligned_answers_at_the_set_fraction(fraction):
    world = World()
    judge = ExactJudge(world)
    settings = OrganismSettings(align_conversations=40, align_single_turn_fraction=fraction, max_turns=4)
    pairs = alignment_corpus(world, settings, random.Random(0))
    single = [conversation for conversation, skip_first in pairs if not skip_first]
    assert len(pairs) == 40 and len(single) == round(40 * fraction)
    # Single-turn answers are aligned and trained on; the rest are multi-turn with the first answer masked.
    for conversation in single:
        assert len(conversation) == 2
        assert judge.label(conversation[0]["content"], conversation[1]["content"])[0] == "aligned"
    assert all(len(conversation) >= 4 for conversation, skip_first in pairs if skip_first)
