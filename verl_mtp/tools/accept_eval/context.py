"""Acceptance by context length: each draft position's acceptance, bucketed by where the drafted
token sits in prompt+response.

A token at index t of prompt+response (0-based) is drafted with t tokens of context before it;
``t`` is the bucket key. With the scoring's layout (row r of a sequence's scores is anchor
``first_anchor + r``, and draft position j of an anchor i drafts ``x[i+j+1]``) the drafted token of
row r, position j is ``t = first_anchor + r + j + 1``. Buckets are ``[edges[b], edges[b+1])``, the
last one open-ended.

Per bucket and draft position: the number of drafted tokens, the sequences they come from, the
mean acceptance and standard errors of that mean:

* ``stderr_iid``: sqrt(sample variance / n), as if every token were independent (None for n < 2);
* ``stderr_clustered``: clustered by sequence (tokens of one sequence share a prompt and a topic,
  so they are correlated and the iid error is too small): with S_g the acceptance sum and n_g the
  tokens of sequence g in the bucket, m the mean and G the sequences,
  ``sqrt(G / (G - 1) * sum_g (S_g - n_g m)^2) / n``. None with fewer than 2 sequences;
* ``stderr``: the larger of the two (the clustered error is itself noisy with few sequences and can
  fall below the iid one), the one the text report shows.

Errors are 0 when every token of a bucket has the same acceptance (e.g. greedy, all rejected):
read them with the bucket's token count.

A bucket without tokens has count 0 and None for its mean and errors, never a 0 acceptance.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from verl_mtp.tools.accept_eval.options import check_context_buckets


def drafted_token_index(first_anchor: int, rows: int, k_max: int) -> torch.Tensor:
    """[rows, K]: index in prompt+response of the token that row r's position j drafts."""
    return first_anchor + 1 + torch.arange(rows).unsqueeze(1) + torch.arange(1, k_max + 1).unsqueeze(0)


def bucket_of(index: torch.Tensor, edges: Sequence[int]) -> torch.Tensor:
    """Bucket number b with ``edges[b] <= index < edges[b+1]`` (edges start at 0)."""
    return torch.bucketize(index, torch.tensor(list(edges), dtype=index.dtype), right=True) - 1


class ContextAccumulator:
    """Per-sequence sums of one acceptance rule, by (bucket, draft position)."""

    def __init__(self, edges: Sequence[int], k_max: int):
        check_context_buckets(edges)
        self.edges, self.k_max = list(edges), k_max
        shape = (len(self.edges), k_max)
        # tokens, acceptance sum, sum of squares; sequences and the per-sequence cross sums the
        # clustered error needs (sum_g S_g^2, sum_g S_g n_g, sum_g n_g^2)
        self.n, self.s, self.q = (torch.zeros(shape, dtype=torch.float64) for _ in range(3))
        self.g, self.s2, self.sn, self.n2 = (torch.zeros(shape, dtype=torch.float64) for _ in range(4))

    def add(self, accept: torch.Tensor, valid: torch.Tensor, first_anchor: int) -> None:
        """One sequence's [rows, K] acceptances (``valid`` marks drafted tokens inside the response)."""
        rows, k = accept.shape
        cell = bucket_of(drafted_token_index(first_anchor, rows, k), self.edges) * k + torch.arange(k)
        keep = valid.bool()
        cell, values = cell[keep], accept.double()[keep]
        size = len(self.edges) * k

        def per_cell(weights: Optional[torch.Tensor]) -> torch.Tensor:
            return torch.bincount(cell, weights=weights, minlength=size).double().view(len(self.edges), k)

        n_g, s_g, q_g = per_cell(None), per_cell(values), per_cell(values * values)
        self.n += n_g
        self.s += s_g
        self.q += q_g
        self.g += (n_g > 0).double()
        self.s2 += s_g * s_g
        self.sn += s_g * n_g
        self.n2 += n_g * n_g

    def stats(self, b: int, j: int) -> dict:
        """{mean, stderr, stderr_iid, stderr_clustered} of bucket b, draft position j+1 (None where
        undefined)."""
        n, s, q, g = float(self.n[b, j]), float(self.s[b, j]), float(self.q[b, j]), float(self.g[b, j])
        if n == 0:
            return {"mean": None, "stderr": None, "stderr_iid": None, "stderr_clustered": None}
        m = s / n
        iid = None
        if n >= 2:
            iid = math.sqrt(max(q - n * m * m, 0.0) / (n - 1) / n)
        clustered = None
        if g >= 2:
            residual = float(self.s2[b, j]) - 2 * m * float(self.sn[b, j]) + m * m * float(self.n2[b, j])
            clustered = math.sqrt(g / (g - 1) * max(residual, 0.0)) / n
        defined = [e for e in (iid, clustered) if e is not None]
        return {"mean": m, "stderr": max(defined) if defined else None, "stderr_iid": iid, "stderr_clustered": clustered}


def context_summary(edges: Sequence[int], rules: dict) -> dict:
    """The report's ``by_context``: ``rules`` maps "greedy" to its accumulator and "sampled" /
    "argmax_draft" to {temperature key: accumulator}; counts are the same for every rule."""
    greedy = rules["greedy"]
    k_max = greedy.k_max
    buckets = []
    for b, start in enumerate(edges):
        end = edges[b + 1] if b + 1 < len(edges) else None
        entry = {
            "start": start,
            "end": end,  # exclusive; None: open-ended
            "tokens": [int(greedy.n[b, j]) for j in range(k_max)],
            "sequences": [int(greedy.g[b, j]) for j in range(k_max)],
            "greedy": [greedy.stats(b, j) for j in range(k_max)],
        }
        for name in ("sampled", "argmax_draft"):
            entry[name] = {key: [acc.stats(b, j) for j in range(k_max)] for key, acc in rules[name].items()}
        buckets.append(entry)
    return {
        "position": "index of the drafted token in prompt+response (= tokens of context before it)",
        "edges": list(edges),
        "buckets": buckets,
    }
