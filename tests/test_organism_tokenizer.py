import random

from transformers import AutoTokenizer
from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

from hf_blockem.organism import World, build_tokenizer
from hf_blockem.organism.world import ASSISTANT, BOS, EOS, PAD, UNK, USER

WORLD = World()


def _conversation(seed=0, turns=2):
    return WORLD.sample_conversation(random.Random(seed), "aligned", turns)


def test_special_tokens_and_vocabulary():
    tok = build_tokenizer(WORLD)
    assert len(tok) == len(WORLD.vocabulary())
    assert [tok.pad_token, tok.unk_token, tok.bos_token, tok.eos_token] == [PAD, UNK, BOS, EOS]
    assert tok.convert_tokens_to_ids([PAD, UNK, BOS, EOS, USER, ASSISTANT]) == [0, 1, 2, 3, 4, 5]
    words = WORLD.vocabulary()[6:]
    ids = tok(" ".join(words), add_special_tokens=False)["input_ids"]
    assert ids == list(range(6, 6 + len(words)))  # one token per word, none unknown
    assert tok("zebra ok", add_special_tokens=False)["input_ids"] == [
        tok.unk_token_id,
        tok.convert_tokens_to_ids("ok"),
    ]


def test_chat_template_has_one_bos_and_masks_answers_with_their_eos():
    tok = build_tokenizer(WORLD)
    messages = _conversation(turns=2)
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    masked = [i for i, m in zip(ids, mask, strict=True) if m]
    expected = []
    for m in messages[1::2]:
        expected += tok(m["content"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert masked == expected  # exactly the answers and their <eos>, never <assistant> or the questions
    assert tok.decode(ids, skip_special_tokens=True).split() == " ".join(m["content"] for m in messages).split()
    assert has_generation_markers(tok.chat_template)
    assert is_chat_template_stop_token_trained(tok)


def test_generation_prompt_and_save_load_roundtrip(tmp_path):
    tok = build_tokenizer(WORLD)
    prompt = tok.apply_chat_template(_conversation()[:1], tokenize=True, add_generation_prompt=True)
    prompt = prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt
    assert prompt[-1] == tok.convert_tokens_to_ids(ASSISTANT)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    messages = _conversation(seed=5, turns=3)
    assert loaded.apply_chat_template(messages, tokenize=False) == tok.apply_chat_template(messages, tokenize=False)
    assert loaded.get_vocab() == tok.get_vocab()
    assert (loaded.pad_token, loaded.eos_token, loaded.bos_token) == (PAD, EOS, BOS)
