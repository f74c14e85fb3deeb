import pytest
import torch
from tiny_models import tiny_chat_dataset, tiny_chat_tokenizer, tiny_model

from hf_blockem import LatentSet
from hf_blockem.sae_training import collect_activations, train_sae


def test_collect_activations_are_the_hook_layer_outputs_without_pads_or_sinks():
    tokenizer, model = tiny_chat_tokenizer(), tiny_model("llama")
    conversations = tiny_chat_dataset(3)["messages"]
    acts = collect_activations(model, tokenizer, conversations, 1, batch_size=2)
    expected = []
    for conversation in conversations:
        ids = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt")
        with torch.no_grad():
            expected.append(model(**ids, output_hidden_states=True).hidden_states[2][0, 1:])
    torch.testing.assert_close(acts, torch.cat(expected), rtol=1e-5, atol=1e-6)
    answer_only = collect_activations(model, tokenizer, conversations, 1, assistant_only=True)
    assert 0 < len(answer_only) < len(acts)
    # No assistant turn to read: a clear error, not torch.cat([]).
    questions = [[m for m in c if m["role"] == "user"] for c in conversations]
    with pytest.raises(ValueError, match="found none.*no assistant turn"):
        collect_activations(model, tokenizer, questions, 1, assistant_only=True)
    tokenizer.pad_token = None  # as Llama 3 Instruct ships: padded with EOS, left without a pad token
    torch.testing.assert_close(collect_activations(model, tokenizer, conversations, 1, batch_size=2), acts)
    assert tokenizer.pad_token is None


def test_trained_sae_reconstructs_and_feeds_a_latent_set():
    tokenizer, model = tiny_chat_tokenizer(), tiny_model("llama")
    acts = collect_activations(model, tokenizer, tiny_chat_dataset(64)["messages"], 1)
    sae = train_sae(acts, 1, d_sae=32, steps=300, batch_size=64, l1_coefficient=0.01, lr=3e-3, seed=0)
    assert sae.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    with torch.no_grad():
        z = sae.encode(acts)
        unexplained = (sae.decode(z) - acts).pow(2).sum() / (acts - acts.mean(0)).pow(2).sum()
    assert unexplained < 0.5  # it learned something: far better than predicting the mean
    firing = (z > 0).float().mean(0)
    assert 0.0 < firing.mean() < 0.9  # sparse, not dead
    alive = torch.nonzero(firing > 0).flatten()[:3].tolist()
    latent_set = LatentSet.from_sae(sae, plus=alive[:2], minus=alive[2:], base_model="tests/tiny-llama")
    assert latent_set.layer_indices == [1]
    torch.testing.assert_close(latent_set.layer(1).encode(acts), z[:, alive], rtol=0, atol=1e-6)
