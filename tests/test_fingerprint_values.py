"""The drafter check's fingerprint values, pinned to their definition on tensors larger than the
weight pattern's period (2**16 words), where ``word_sums`` folds the words into column sums of
whole rows (the path small tensors never take): S1 = sum x_i, S2 = sum w(i) x_i with unsigned
16-bit words x_i and w(i) = ((i * 40503) mod 2**16) + 1, both mod 2**61 - 1 (module doc of
``verl_mtp.rollout.drafter_sync.fingerprint``)."""

import pytest
import torch

import verl_mtp.rollout.drafter_sync.fingerprint as fp

MODULUS = (1 << 61) - 1


def definition(tensor: torch.Tensor, word_offset: int = 0) -> tuple[int, int]:
    """(S1, S2) straight from the definition, in int64 (exact at these sizes)."""
    raw = tensor.contiguous().reshape(-1).view(torch.uint8)
    words = raw.view(torch.int16).to(torch.int64) & 0xFFFF if raw.numel() % 2 == 0 else raw.to(torch.int64)
    position = torch.arange(word_offset, word_offset + words.numel(), dtype=torch.int64)
    weight = ((position * 40503) & 0xFFFF) + 1
    return int(words.sum()) % MODULUS, int((words * weight).sum()) % MODULUS


def _tensors():
    g = torch.Generator().manual_seed(5)
    return {
        "float32": torch.randn(300, 701, generator=g),  # 420,600 words: several rows, a partial last one
        "bfloat16": (torch.randn(3, 65537, generator=g) * 100).to(torch.bfloat16),
        "int8 odd bytes": (torch.randn(150001, generator=g) * 60).to(torch.int8),  # 8-bit words
        "all ones bits": torch.full((200000,), -1, dtype=torch.int16),  # every word 0xFFFF: the largest sums
    }


@pytest.mark.parametrize("chunk_words", [None, 40000, 70000])
@pytest.mark.parametrize("word_offset", [0, 1, 65535, 12345 + (1 << 20)])
def test_large_tensors_have_the_fingerprint_of_the_definition(word_offset, chunk_words, monkeypatch):
    if chunk_words is not None:  # chunks that start anywhere within the period, shorter or longer than it
        monkeypatch.setattr(fp, "_CHUNK_WORDS", chunk_words)
    for label, tensor in _tensors().items():
        assert fp.word_sums(tensor, word_offset) == definition(tensor, word_offset), label


def test_pieces_that_cross_the_period_sum_to_the_whole():
    whole = torch.randn(400, 513, generator=torch.Generator().manual_seed(6))
    flat = whole.reshape(-1)
    cuts = [0, 65535, 65537, 131072 + 3, 200000, flat.numel()]
    pieces = [(a, flat[a:b]) for a, b in zip(cuts, cuts[1:])]
    fingerprint = fp.fingerprint_pieces(pieces, dtype=whole.dtype, shape=whole.shape)
    assert (fingerprint.word_sum, fingerprint.weighted_sum) == definition(whole)
