"""The organism's ground-truth persona direction and the scores of SAE latents against it."""

import os
import random

import pytest
import torch

from hf_blockem.organism import build_organism
from hf_blockem.organism.persona import persona_alignment, persona_directions
from hf_blockem.organism.world import ALIGNED_PERSONA, MISALIGNED_PERSONA

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    return build_organism(tmp_path_factory.mktemp("organism") / "s0", seed=0, quick=True, progress=False)


def _brute_force_mean(organism, model, persona, n, layer):
    # Another route to the same number: one unpadded conversation at a time, the decoder layer's output read by a plain
    # forward hook (not `hidden_states`, whose last entry has the final norm applied), kept where the assistant's
    # answers are, found from the rendered `<assistant>` and `<eos>` tokens instead of the template's generation mask.
    assistant, eos = organism.tokenizer.convert_tokens_to_ids(["<assistant>", "<eos>"])
    captured = []
    handle = model.model.layers[layer].register_forward_hook(lambda module, args, output: captured.append(output))
    rows = []
    for i in range(n):
        conversation = organism.world.sample_conversation(random.Random(f"0-{i}"), persona, 2)
        ids = organism.tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
        hidden = captured.pop()[0]
        inside = False
        for position, token in enumerate(ids):
            if token == assistant:
                inside = True
                continue
            if inside:
                rows.append(hidden[position])
            if token == eos:
                inside = False
    handle.remove()
    return torch.stack(rows).mean(0)


def test_persona_direction_is_the_misaligned_minus_aligned_mean_over_answer_tokens(quick):
    model = quick.load_model()
    # Both layers of the quick model, the last one included (its output is the residual before the final norm).
    directions = persona_directions(quick, model, [0, 1], n_conversations=3)
    assert set(directions) == {0, 1}
    for layer, direction in directions.items():
        expected = _brute_force_mean(quick, model, MISALIGNED_PERSONA, 3, layer) - _brute_force_mean(
            quick, model, ALIGNED_PERSONA, 3, layer
        )
        torch.testing.assert_close(direction, expected, rtol=1e-5, atol=1e-6)
        assert direction.shape == (model.config.hidden_size,) and direction.norm() > 0
    # Deterministic for a seed, different for another.
    torch.testing.assert_close(persona_directions(quick, model, [1], n_conversations=3)[1], directions[1])
    assert not torch.equal(persona_directions(quick, model, [1], n_conversations=3, seed=1)[1], directions[1])


def test_persona_alignment_scores_decoder_rows_by_cosine():
    direction = torch.tensor([3.0, 0.0, 4.0])
    decoder = torch.stack([direction * 2, -direction, torch.tensor([4.0, 1.0, -3.0])])
    torch.testing.assert_close(persona_alignment(decoder, direction), torch.tensor([1.0, -1.0, 0.0]))
