import torch
from tiny_models import HIDDEN, tiny_sae

from hf_blockem import LatentSet
from hf_blockem.penalty import block_penalty_sum, loss_token_mask, one_sided_excess


def test_formula_is_one_sided_per_sign():
    signs = torch.tensor([1.0, 1.0, -1.0, -1.0])
    z_base = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    z = torch.tensor([[3.0, 0.0, 0.5, 4.0]])
    # K+: only upward moves count (3 - 1 = 2; 0 < 1 is free). K-: only downward moves (1 - 0.5 = 0.5; 4 > 1 is free).
    assert one_sided_excess(z, z_base, signs).tolist() == [[2.0, 0.0, 0.5, 0.0]]
    assert block_penalty_sum(z, z_base, signs).item() == 2.0**2 + 0.5**2


def test_penalty_is_zero_when_unchanged_and_gradient_only_through_z():
    z_base = torch.rand(5, 3)
    z = z_base.clone().requires_grad_(True)
    signs = torch.tensor([1.0, -1.0, 1.0])
    penalty = block_penalty_sum(z, z_base, signs)
    assert penalty.item() == 0.0
    penalty.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


def test_half_precision_inputs_are_computed_in_fp32_and_stay_finite():
    z_base = torch.zeros(4, 2, dtype=torch.bfloat16)
    z = torch.tensor([[1e4, 0.0], [0.0, 0.0], [300.0, 0.0], [0.0, 0.0]], dtype=torch.bfloat16)
    penalty = block_penalty_sum(z, z_base, torch.tensor([1.0, 1.0]))
    assert penalty.dtype == torch.float32
    assert torch.isfinite(penalty)
    # 1e4² alone exceeds the fp16 range (65504): the sum must not overflow.
    assert penalty.item() > 65504
    z16 = torch.tensor([[300.0]], dtype=torch.float16)
    assert block_penalty_sum(z16, torch.zeros_like(z16), torch.tensor([1.0])).item() == 90000.0


def test_bf16_activations_near_the_base_do_not_cancel():
    # A bf16 model's hidden states a small step away from the base's: the regime at the start of training, where
    # encoding and subtracting in bf16 would lose the difference. Our path (encode, subtract, square in fp32) must
    # agree with a float64 computation on the same bf16 inputs, and give exactly 0 on identical inputs.
    blocked = LatentSet.from_sae(tiny_sae(), plus=[1, 5, 9], minus=[7, 12], layer=1, base_model="tiny").layers[0]
    g = torch.Generator().manual_seed(0)
    base = (4 * torch.randn(256, HIDDEN, generator=g)).bfloat16()
    moved = (base.float() + 0.05 * torch.randn(256, HIDDEN, generator=g)).bfloat16()
    signs = blocked.signs

    assert block_penalty_sum(blocked.encode(base), blocked.encode(base), signs).item() == 0.0

    def encode64(x):
        pre = (x.double() - blocked.b_dec.double()) @ blocked.W_enc.double() + blocked.b_enc.double()
        return torch.relu(pre)

    exact = torch.relu((encode64(moved) - encode64(base)) * signs.double()).square().sum().item()
    ours = block_penalty_sum(blocked.encode(moved), blocked.encode(base), signs).item()
    assert exact > 0 and abs(ours - exact) <= 1e-5 * exact
    # What the fp32 path protects against: the same computation in bf16 is off by far more.
    b_dec, W_enc, b_enc = (t.bfloat16() for t in (blocked.b_dec, blocked.W_enc, blocked.b_enc))
    z16, z16_base = (torch.relu((x - b_dec) @ W_enc + b_enc) for x in (moved, base))
    naive = torch.relu((z16 - z16_base) * signs.bfloat16()).square().sum().float().item()
    assert abs(naive - exact) > 100 * abs(ours - exact)


def test_mask_honours_labels_padding_and_first_token():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, 8, 9, 10]])
    attention = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    mask = loss_token_mask(labels, attention_mask=attention)
    assert mask.tolist() == [[False, False, True, True, False], [False, True, True, True, True]]


def test_first_token_is_excluded_whatever_the_padding_side():
    # The same two sequences, right-padded and left-padded, labels on every real token.
    right_ids = torch.tensor([[1, 11, 12, 13], [1, 21, 0, 0]])
    right_attn = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    left_ids = torch.tensor([[1, 11, 12, 13], [0, 0, 1, 21]])
    left_attn = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    right = loss_token_mask(right_ids.masked_fill(right_attn == 0, -100), attention_mask=right_attn)
    left = loss_token_mask(left_ids.masked_fill(left_attn == 0, -100), attention_mask=left_attn)
    assert right.tolist() == [[False, True, True, True], [False, True, False, False]]
    assert left.tolist() == [[False, True, True, True], [False, False, False, True]]
    assert right_ids[right].tolist() == left_ids[left].tolist()
    kept = loss_token_mask(right_ids, attention_mask=right_attn, exclude_first_token=False)
    assert kept[:, 0].all()


def test_padding_free_packing_uses_position_ids():
    # Two sequences packed into one row, no attention mask (what TRL sends with padding_free=True).
    input_ids = torch.tensor([[1, 11, 12, 1, 21, 22, 23]])
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    labels = torch.tensor([[-100, 11, 12, -100, 21, 22, 23]])
    mask = loss_token_mask(labels, position_ids=position_ids, input_ids=input_ids)
    assert input_ids[mask].tolist() == [11, 12, 21, 22, 23]
    # With a label on the sequence start, position id 0 still excludes it.
    mask = loss_token_mask(input_ids.clone(), position_ids=position_ids)
    assert input_ids[mask].tolist() == [11, 12, 21, 22, 23]


def test_bos_tokens_are_excluded_anywhere():
    input_ids = torch.tensor([[2, 5, 2, 6]])
    mask = loss_token_mask(input_ids, input_ids=input_ids, bos_token_id=2, exclude_first_token=False)
    assert mask.tolist() == [[False, True, False, True]]


def test_all_masked_gives_empty_selection_and_zero_penalty():
    labels = torch.full((2, 4), -100)
    mask = loss_token_mask(labels, attention_mask=torch.ones(2, 4))
    assert not mask.any()
    z = torch.rand(2, 4, 3, requires_grad=True)
    penalty = block_penalty_sum(z[mask], z.detach()[mask], torch.ones(3))
    assert penalty.item() == 0.0 and penalty.requires_grad
