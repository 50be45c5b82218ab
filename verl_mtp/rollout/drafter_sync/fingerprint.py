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
* cheap: because w has period 2**16, the weights of any chunk are a slice of one cached table, and
  (S1, S2) of a chunk is one matrix-vector product of the table's rows (1, w) with the chunk's
  words in float64 (exact, see ``_CHUNK_WORDS``): a conversion and one pass per chunk of 2**20
  words (8 MiB of scratch), one host sync per tensor; the table is 9 MiB per device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch

_MODULUS = (1 << 61) - 1
_WEIGHT_MULTIPLIER = 40503  # odd: i -> i * m mod 2**16 is a permutation, so weights differ locally
_PERIOD = 1 << 16  # w(i) depends on i mod 2**16 only
# float64 holds every integer below 2**53 exactly: a chunk's products are < 2**32 and its sums
# < 2**52, so any summation order (BLAS, GPU) gives the exact integer
_CHUNK_WORDS = 1 << 20
_TABLES: dict[torch.device, torch.Tensor] = {}


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


def _weight_table(device: torch.device) -> torch.Tensor:
    """Rows (1, w(i)) for i < _CHUNK_WORDS + _PERIOD as float64 (cached per device): a chunk at any
    position p reads its weights as the slice starting at p mod _PERIOD (w has period _PERIOD)."""
    table = _TABLES.get(device)
    if table is None:
        position = torch.arange(_CHUNK_WORDS + _PERIOD, device=device, dtype=torch.int64)
        weight = ((position * _WEIGHT_MULTIPLIER) & 0xFFFF) + 1
        table = _TABLES[device] = torch.stack((torch.ones_like(weight), weight)).to(torch.float64)
    return table


def word_sums(tensor: torch.Tensor, word_offset: int = 0, word_bytes: Optional[int] = None) -> tuple[int, int]:
    """(S1, S2) of ``tensor``'s words, positions starting at ``word_offset`` (see module doc).

    ``word_bytes`` (2 or 1) defaults to 2 when the tensor's byte count is even.
    """
    nbytes = tensor.numel() * tensor.element_size()
    words = _words(tensor, word_bytes or _word_bytes(nbytes))
    if words.numel() == 0:
        return 0, 0
    table = _weight_table(words.device)
    partial = []
    for start in range(0, words.numel(), _CHUNK_WORDS):
        # int16 words read as unsigned through int32 (uint16 tensors lack ops on some devices)
        chunk = words[start : start + _CHUNK_WORDS].to(torch.int32)
        if words.dtype == torch.int16:
            chunk.bitwise_and_(0xFFFF)
        chunk = chunk.to(torch.float64)
        shift = (word_offset + start) % _PERIOD
        partial.append(torch.mv(table[:, shift : shift + chunk.numel()], chunk))  # one pass: (S1, S2)
    s1 = s2 = 0
    for chunk_s1, chunk_s2 in torch.stack(partial).cpu().tolist():  # one host sync per tensor
        s1 = (s1 + int(chunk_s1)) % _MODULUS
        s2 = (s2 + int(chunk_s2)) % _MODULUS
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
