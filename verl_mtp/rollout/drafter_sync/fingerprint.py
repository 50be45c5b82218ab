"""Exact, order-independent checksums of a tensor's bits (the maths of the drafter check).

The tensor's bytes are read as unsigned 16-bit words (8-bit when the byte count is odd) x_i, and
two sums are kept modulo the prime P = 2**61 - 1:  S1 = sum x_i  and  S2 = sum w(i) x_i  with a fixed
position pattern w(i) = ((i * 40503) mod 2**16) + 1. Why this choice:

* exact and order independent: integer sums give the same value on any device, with any
  reduction order, so trainer and engine fingerprints compare with ``==`` (float sums would not);
* a change confined to one element of up to 4 bytes (bf16, fp16, fp32, int8) is always detected:
  one changed word moves S1; two changed words that cancel in S1 move S2 because their weights
  differ; swapped elements move S2;
* additive over pieces: a tensor that arrives in contiguous pieces (flat byte ranges, such as row
  blocks or the byte chunks of verl's checkpoint engines) has the fingerprint of the whole when each
  piece is hashed at its word offset (``fingerprint_pieces``). Column-split (TP) shards or fused
  tensors are not contiguous pieces of the HF tensor; we avoid needing them by fingerprinting the
  tensors before the engine fuses/shards them;
* bits, not values: dtype and shape are part of the fingerprint; the same values in another dtype
  are reported as a dtype difference (verl's bucketed transfer keeps dtypes);
* cheap: w has period 2**16, so S2 = sum_j w(j) c_j where c_j sums the words whose position is
  j mod 2**16. A chunk of up to 2**20 words is laid into whole rows of 2**16 int32 (zero padded
  at both ends, the row start aligned with the period), the rows are summed into c in int32 and
  (S1, S2) = (sum c, w . c) in int64, all exact (see ``_CHUNK_WORDS``): a conversion and one pass
  per chunk (4 MiB of scratch), no float maths, one host sync per tensor; the weight row w is
  512 KiB per device. A chunk that fits within one period is weighed directly by a slice of w.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch

_MODULUS = (1 << 61) - 1
_WEIGHT_MULTIPLIER = 40503  # odd: i -> i * m mod 2**16 is a permutation, so weights differ locally
_PERIOD = 1 << 16  # w(i) depends on i mod 2**16 only
# exact integers throughout: a chunk spans at most _CHUNK_WORDS // _PERIOD + 2 rows of words below
# 2**16, so its column sums stay below 2**31 (int32) while _CHUNK_WORDS < 2**30, and w . c below 2**63
_CHUNK_WORDS = 1 << 20
_WEIGHTS: dict[torch.device, torch.Tensor] = {}


@dataclass(frozen=True)
class TensorFingerprint:
    dtype: str
    shape: tuple[int, ...]
    word_sum: int
    weighted_sum: int

    def to_wire(self) -> tuple:
        """Plain tuple (RPC/pickle friendly, no torch types)."""
        return (self.dtype, tuple(self.shape), self.word_sum, self.weighted_sum)

    @classmethod
    def from_wire(cls, wire: Iterable) -> "TensorFingerprint":
        dtype, shape, s1, s2 = wire
        return cls(str(dtype), tuple(int(d) for d in shape), int(s1), int(s2))

    def difference(self, other: "TensorFingerprint") -> str:
        """What differs, for messages ('' when equal)."""
        if self.dtype != other.dtype:
            return f"dtype {self.dtype} vs {other.dtype}"
        if self.shape != other.shape:
            return f"shape {list(self.shape)} vs {list(other.shape)}"
        if self != other:
            return "values differ (checksum mismatch)"
        return ""


def _word_bytes(nbytes: int) -> int:
    return 2 if nbytes % 2 == 0 else 1


def _words(tensor: torch.Tensor, word_bytes: int) -> torch.Tensor:
    """The tensor's bytes as a flat tensor of words (int16 or uint8; read as unsigned)."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    raw = flat.view(torch.uint8)
    if word_bytes == 1:
        return raw
    if raw.numel() % 2:
        raise ValueError(f"a tensor of {raw.numel()} bytes cannot be read as 16-bit words")
    return raw.view(torch.int16)


def _weight_row(device: torch.device) -> torch.Tensor:
    """w(j) for j < _PERIOD as int64 (cached per device): the weight of every position p = j mod _PERIOD."""
    weight = _WEIGHTS.get(device)
    if weight is None:
        position = torch.arange(_PERIOD, device=device, dtype=torch.int64)
        weight = _WEIGHTS[device] = ((position * _WEIGHT_MULTIPLIER) & 0xFFFF) + 1
    return weight


def word_sums(tensor: torch.Tensor, word_offset: int = 0, word_bytes: Optional[int] = None) -> tuple[int, int]:
    """(S1, S2) of ``tensor``'s words, positions starting at ``word_offset`` (see module doc).

    ``word_bytes`` (2 or 1) defaults to 2 when the tensor's byte count is even.
    """
    nbytes = tensor.numel() * tensor.element_size()
    words = _words(tensor, word_bytes or _word_bytes(nbytes))
    if words.numel() == 0:
        return 0, 0
    weight = _weight_row(words.device)
    signed = words.dtype == torch.int16  # int16 words are read as unsigned: & 0xFFFF after widening
    partial = []
    for start in range(0, words.numel(), _CHUNK_WORDS):
        chunk = words[start : start + _CHUNK_WORDS]
        n = chunk.numel()
        head = (word_offset + start) % _PERIOD  # column of the chunk's first word
        if head + n <= _PERIOD:  # within one period: weigh the words directly
            x = chunk.to(torch.int64)
            if signed:
                x.bitwise_and_(0xFFFF)
            partial.append(torch.stack((x.sum(), (x * weight[head : head + n]).sum())))
            continue
        rows = -(-(head + n) // _PERIOD)
        laid = torch.empty(rows * _PERIOD, dtype=torch.int32, device=words.device)
        laid[:head].zero_()
        laid[head + n :].zero_()
        body = laid[head : head + n]
        body.copy_(chunk)
        if signed:
            body.bitwise_and_(0xFFFF)
        column = laid.view(rows, _PERIOD).sum(0, dtype=torch.int32).to(torch.int64)
        partial.append(torch.stack((column.sum(), (column * weight).sum())))
    s1 = s2 = 0
    for chunk_s1, chunk_s2 in torch.stack(partial).cpu().tolist():  # one host sync per tensor
        s1 = (s1 + chunk_s1) % _MODULUS
        s2 = (s2 + chunk_s2) % _MODULUS
    return s1, s2


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def fingerprint_tensor(tensor: torch.Tensor) -> TensorFingerprint:
    s1, s2 = word_sums(tensor)
    return TensorFingerprint(_dtype_name(tensor.dtype), tuple(tensor.shape), s1, s2)


def fingerprint_pieces(
    pieces: Iterable[tuple[int, torch.Tensor]], *, dtype: torch.dtype, shape: Iterable[int]
) -> TensorFingerprint:
    """Fingerprint of a whole tensor that arrives as contiguous pieces ``(flat_element_offset, piece)``
    (row blocks of the HF tensor, or its flat chunks). Equals ``fingerprint_tensor(whole)``."""
    shape = tuple(int(d) for d in shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    word_bytes = _word_bytes(itemsize * torch.Size(shape).numel())
    s1 = s2 = 0
    for element_offset, piece in pieces:
        if piece.dtype != dtype:
            raise ValueError(f"piece dtype {piece.dtype} differs from the whole tensor's {dtype}")
        byte_offset = element_offset * itemsize
        if byte_offset % word_bytes:
            raise ValueError(f"a piece at element {element_offset} does not start on a {word_bytes}-byte word")
        p1, p2 = word_sums(piece, byte_offset // word_bytes, word_bytes)
        s1, s2 = (s1 + p1) % _MODULUS, (s2 + p2) % _MODULUS
    return TensorFingerprint(_dtype_name(dtype), shape, s1, s2)


def module_digest(module: torch.nn.Module, exclude: Iterable[torch.Tensor] = ()) -> tuple[int, int]:
    """One combined checksum of a module's parameters (storage shared with ``exclude`` skipped)."""
    skip = {t.data_ptr() for t in exclude}
    s1 = s2 = 0
    for index, (name, param) in enumerate(sorted(module.named_parameters(), key=lambda item: item[0])):
        if param.data_ptr() in skip:
            continue
        p1, p2 = word_sums(param.data)
        # mix the parameter's index in so that two parameters swapping contents changes the digest
        s1 = (s1 + p1 * (index + 1)) % _MODULUS
        s2 = (s2 + p2 * (index + 7)) % _MODULUS
    return s1, s2
