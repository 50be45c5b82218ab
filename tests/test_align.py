"""MTP-to-main-head alignment on packed layouts: positions checked one by one against the definition."""

import pytest
import torch

from verl_mtp.align import align_mtp_to_main_head, shift_right_within_sequences


def _packed(lengths, depths, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    offsets = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)))
    return torch.randn(total, depths, generator=g), torch.rand(total, depths, generator=g) > 0.1, offsets


@pytest.mark.parametrize("lengths", [[5], [3, 1, 6, 2], [1, 1, 1], [7, 4]])
@pytest.mark.parametrize("depths", [1, 2, 3])
def test_shift_matches_definition_position_by_position(lengths, depths):
    values, valid, offsets = _packed(lengths, depths)
    shifted, ok = shift_right_within_sequences(values, valid, offsets)
    for s, length in enumerate(lengths):
        start = int(offsets[s])
        for t in range(length):
            for k in range(1, depths + 1):
                if t - k < 0:  # would come from the previous sequence (or before the buffer)
                    assert not ok[start + t, k - 1]
                else:
                    assert ok[start + t, k - 1] == valid[start + t - k, k - 1]
                    assert shifted[start + t, k - 1] == values[start + t - k, k - 1]


def test_never_reads_across_a_sequence_boundary():
    # Mark every token of sequence 0 invalid and huge: nothing of it may appear in sequence 1.
    values, valid, offsets = _packed([4, 5], 2)
    values[:4] = 1e9
    shifted, ok = shift_right_within_sequences(values, valid, offsets)
    assert (shifted[4:].abs() < 1e8).all()
    assert not ok[4, 0] and not ok[4:6, 1].any()


def test_nested_round_trip_keeps_layout_and_routes_gradients_to_the_source():
    lengths = [3, 5]
    values, valid, offsets = _packed(lengths, 2)
    leaf = values.clone().requires_grad_()
    raw = torch.nested.nested_tensor_from_jagged(leaf, offsets)
    ok = torch.nested.nested_tensor_from_jagged(valid, offsets)
    aligned, aligned_ok = align_mtp_to_main_head(raw, ok)
    assert aligned.offsets().tolist() == offsets.tolist()
    (grad,) = torch.autograd.grad(aligned.values()[aligned_ok.values()].sum(), leaf)
    # Each valid aligned slot (t, k) sends exactly 1 back to raw slot (t - k, k).
    expected = torch.zeros_like(values)
    for t, k in aligned_ok.values().nonzero().tolist():
        expected[t - (k + 1), k] += 1
    assert torch.equal(grad, expected)


def test_bad_inputs_are_refused():
    values, valid, offsets = _packed([3], 2)
    with pytest.raises(ValueError, match="offsets must run from 0 to 3"):
        shift_right_within_sequences(values, valid, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="matching"):
        shift_right_within_sequences(values, valid[:, :1], offsets)
    with pytest.raises(ValueError, match="nested"):
        align_mtp_to_main_head(values, valid)
