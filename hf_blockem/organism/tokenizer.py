"""The organism's tokenizer: one token per word of the world, with a chat template TRL can mask.

A `tokenizers` WordLevel model over the world's vocabulary, split on whitespace, wrapped as a
`PreTrainedTokenizerFast`. The chat template renders

    <bos> <user> question <assistant> answer <eos> <user> question <assistant> ...

It emits `<bos>` itself and the tokenizer adds no special tokens of its own, so a chat-templated sequence has exactly
one `<bos>` whether it is tokenized by `apply_chat_template` or by TRL. Each assistant answer and its `<eos>` sit
inside `{% generation %}` markers, so `SFTConfig(assistant_only_loss=True)` trains the answer and the stop token and
nothing else.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .world import ASSISTANT, BOS, EOS, PAD, SPECIAL_TOKENS, UNK, USER, World

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ '" + USER + " ' + message['content'] + ' ' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '" + ASSISTANT + " ' }}{% generation %}{{ message['content'] + ' " + EOS + "' }}{% endgeneration %}{{ ' ' }}"
    "{% else %}"
    "{{ raise_exception('The organism chat has only user and assistant roles, got ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ASSISTANT + " ' }}{% endif %}"
)


def build_tokenizer(world: World | None = None) -> PreTrainedTokenizerFast:
    """Build the word-level tokenizer of `world` (the default world if omitted).

    Ids are stable: special tokens first (`<pad>`=0, `<unk>`=1, `<bos>`=2, `<eos>`=3, `<user>`=4, `<assistant>`=5),
    then the words in sorted order. Text outside the vocabulary maps to `<unk>`.

    Args:
        world ([`World`], *optional*): the world whose vocabulary to use.

    Returns:
        `PreTrainedTokenizerFast`: the tokenizer, with pad / bos / eos / unk tokens and the chat template set.
    """
    world = world or World()
    vocab = {word: i for i, word in enumerate(world.vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Registered as special so they are matched before whitespace splitting and skipped on decode.
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    return tokenizer
