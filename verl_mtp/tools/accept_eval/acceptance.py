"""The acceptance of one draft position (maths on logits) and its chain-rule aggregation over
anchors (see the package doc for the three rules and what is reported)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def greedy_acceptance(target_logits: torch.Tensor, draft_logits: torch.Tensor) -> torch.Tensor:
    """[n, V] x [n, V] -> [n]: 1.0 where the draft's argmax is the target's argmax."""
    return (draft_logits.argmax(-1) == target_logits.argmax(-1)).to(torch.float64)


def sampled_acceptance(target_logits: torch.Tensor, draft_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """[n]: sum_v min(p_T(v), q_T(v)), speculative sampling's acceptance probability."""
    p = torch.softmax(target_logits.double() / temperature, dim=-1)
    q = torch.softmax(draft_logits.double() / temperature, dim=-1)
    return torch.minimum(p, q).sum(-1)


def argmax_draft_acceptance(
    target_logits: torch.Tensor, draft_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """[n]: p_T(argmax q), the acceptance of a greedily drafted token verified by sampling at T."""
    p = torch.softmax(target_logits.double() / temperature, dim=-1)
    return p.gather(-1, draft_logits.argmax(-1, keepdim=True)).squeeze(-1)


@dataclass
class ChainAccumulator:
    """Sums over anchors of per-position acceptances a[n, K] (valid[n, K] monotone in j).

    ``prefix[j]`` = prod_{i<=j} a_i (accepted up to and including position j).
    """

    k_max: int
    anchors: list = field(default_factory=list)  # [K] anchors where position j is valid
    accept_sum: list = field(default_factory=list)  # [K] sum of a_j
    prefix_sum: list = field(default_factory=list)  # [K] sum of prefix[j]
    prev_prefix_sum: list = field(default_factory=list)  # [K] sum of prefix[j-1] (1 for j=1)
    length_sum: list = field(default_factory=list)  # [K] sum over anchors valid up to K of sum_{j<=K} prefix[j]

    def __post_init__(self):
        for name in ("anchors", "accept_sum", "prefix_sum", "prev_prefix_sum", "length_sum"):
            if not getattr(self, name):
                setattr(self, name, [0.0] * self.k_max)

    def add(self, accept: torch.Tensor, valid: torch.Tensor) -> None:
        accept = accept.double() * valid
        valid = valid.double()
        prefix = torch.cumprod(accept, dim=-1)
        prev = torch.cat([torch.ones_like(prefix[:, :1]), prefix[:, :-1]], dim=-1)
        accepted_upto = torch.cumsum(prefix, dim=-1)  # accepted drafts when K = j
        for j in range(self.k_max):
            self.anchors[j] += float(valid[:, j].sum())
            self.accept_sum[j] += float(accept[:, j].sum())
            self.prefix_sum[j] += float((prefix[:, j] * valid[:, j]).sum())
            self.prev_prefix_sum[j] += float((prev[:, j] * valid[:, j]).sum())
            self.length_sum[j] += float((accepted_upto[:, j] * valid[:, j]).sum())

    def summary(self) -> dict:
        def ratio(a, b):
            return a / b if b > 0 else None

        positions = []
        for j in range(self.k_max):
            positions.append(
                {
                    "position": j + 1,
                    "anchors": int(self.anchors[j]),
                    "marginal": ratio(self.accept_sum[j], self.anchors[j]),
                    "conditional": ratio(self.prefix_sum[j], self.prev_prefix_sum[j]),
                }
            )
        expected = [ratio(self.length_sum[j], self.anchors[j]) for j in range(self.k_max)]
        return {
            "positions": positions,
            "expected_accepted": expected,
            "tokens_per_step": [None if e is None else 1.0 + e for e in expected],
        }


def chain_expected_accepted(accept: torch.Tensor) -> torch.Tensor:
    """[n, K] per-position acceptances -> [K]: mean over anchors of sum_{j<=K} prod_{i<=j} a_i."""
    return torch.cumsum(torch.cumprod(accept.double(), dim=-1), dim=-1).mean(0)
