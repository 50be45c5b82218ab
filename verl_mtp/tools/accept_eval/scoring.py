"""accept-eval's megatron-core run: the teacher-forced trunk and chained MTP hidden states of a
prompt+response, and the per-anchor acceptances of every draft position (see the package doc)."""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from verl_mtp.tools.accept_eval.acceptance import argmax_draft_acceptance, greedy_acceptance, sampled_acceptance
from verl_mtp.tools.accept_eval.options import DEFAULT_ANCHOR_CHUNK


def layer_for_position(num_layers: int, k_max: int) -> list[int]:
    """MTP layer (0-based) that drafts position j = 1..k_max: ``(j-1) % num_layers``."""
    return [(j - 1) % num_layers for j in range(1, k_max + 1)]


def _megatron_device_context(device: torch.device):
    if device.type == "cpu":
        from verl_mtp.local_megatron.single_process import cpu_megatron

        return cpu_megatron()
    import contextlib

    return contextlib.nullcontext()


@torch.no_grad()
def teacher_forced_hidden(model, input_ids: torch.Tensor, layers: Sequence[int]):
    """Trunk and chained MTP hidden states of ``input_ids`` [1, s].

    Returns ``(main_hidden, [draft_hidden_j for j in 1..len(layers)])``, each [s, 1, h] as
    megatron lays them out (the trunk's after the final norm, ready for the output layer).
    The trunk runs through ``GPTModel.forward``; its ``_postprocess`` is swapped on the instance
    for one that chains ``model.mtp.layers[layers[j-1]]`` (megatron's own layer forward, which
    rolls the ids and embeds the next tokens), so a layer can be reused for later positions.
    """
    from verl_mtp.local_megatron.single_process import causal_mask

    device = input_ids.device
    seq_len = input_ids.shape[1]
    position_ids = torch.arange(seq_len, device=device).unsqueeze(0)
    mask = causal_mask(seq_len).to(device)
    result = {}

    def chained_postprocess(self, **kw):
        hidden, ids, pos = kw["hidden_states"], kw["input_ids"], kw["position_ids"]
        padding_mask = kw.get("padding_mask")
        drafts = []
        for index in layers:
            layer = self.mtp.layers[index]
            wanted = inspect.signature(layer.forward).parameters
            kwargs = dict(
                input_ids=ids, position_ids=pos, hidden_states=hidden, attention_mask=kw.get("attention_mask"),
                rotary_pos_emb=kw.get("rotary_pos_emb"), rotary_pos_cos=kw.get("rotary_pos_cos"),
                rotary_pos_sin=kw.get("rotary_pos_sin"), packed_seq_params=kw.get("packed_seq_params"),
                sequence_len_offset=kw.get("sequence_len_offset"), embedding=self.embedding,
            )
            if "padding_mask" in wanted:  # megatron-core >= 0.17
                kwargs["padding_mask"] = padding_mask
            out = layer(**kwargs)
            hidden, ids, pos = out[0], out[1], out[2]
            if len(out) > 3:
                padding_mask = out[3]
            drafts.append(hidden)
        result["main"], result["drafts"] = kw["hidden_states"], drafts
        return kw["hidden_states"]

    had_own = "_postprocess" in model.__dict__
    previous = model.__dict__.get("_postprocess")
    model._postprocess = types.MethodType(chained_postprocess, model)
    try:
        with _megatron_device_context(device):
            model(input_ids, position_ids, mask)
    finally:
        if had_own:
            model._postprocess = previous
        else:
            del model._postprocess
    return result["main"], result["drafts"]


def _logits(model, hidden: torch.Tensor, vocab_size: Optional[int]) -> torch.Tensor:
    """Output-layer logits of hidden [n, 1, h] -> [n, V] (float32, padded vocabulary rows cut)."""
    from verl_mtp.megatron.mtp_log_probs import output_logits

    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    logits = output_logits(model.output_layer, hidden, weight, False, None)[:, 0].float()
    return logits[:, :vocab_size] if vocab_size else logits


@dataclass
class SequenceScores:
    """Per-anchor acceptances of one sequence: metric name -> ([n, K] accept, [n, K] valid)."""

    greedy: torch.Tensor
    valid: torch.Tensor
    sampled: dict  # temperature -> [n, K]
    argmax_draft: dict  # temperature -> [n, K]

    @staticmethod
    def joined(chunks: Sequence[SequenceScores]) -> SequenceScores:
        """The scores of consecutive anchor chunks as one, on the CPU."""

        def cat(part) -> torch.Tensor:
            return torch.cat([part(chunk) for chunk in chunks]).cpu()

        temperatures = list(chunks[0].sampled)
        return SequenceScores(
            greedy=cat(lambda c: c.greedy),
            valid=cat(lambda c: c.valid),
            sampled={t: cat(lambda c: c.sampled[t]) for t in temperatures},
            argmax_draft={t: cat(lambda c: c.argmax_draft[t]) for t in temperatures},
        )


def first_anchor(prompt_len: int) -> int:
    """Index of a sequence's first anchor: its last prompt token (the first decode step)."""
    return max(prompt_len - 1, 0)


@torch.no_grad()
def score_sequence(
    model,
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    *,
    k_max: int,
    temperatures: Sequence[float],
    vocab_size: Optional[int] = None,
    device: torch.device = torch.device("cpu"),
    anchor_chunk: int = DEFAULT_ANCHOR_CHUNK,
) -> Optional[SequenceScores]:
    """Acceptances of every anchor of one prompt+response; None when the response is too short
    to draft anything (fewer than 2 tokens)."""
    ids = list(prompt_ids) + list(response_ids)
    length, start = len(ids), len(prompt_ids)
    first, last_anchor = first_anchor(start), length - 3  # anchor i drafts x[i+2] first
    if last_anchor < first:
        return None
    num_layers = len(model.mtp.layers)
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    main_hidden, draft_hidden = teacher_forced_hidden(model, input_ids, layer_for_position(num_layers, k_max))

    chunks = [
        _score_anchors(
            model, main_hidden, draft_hidden, a, min(a + anchor_chunk, last_anchor + 1), length,
            k_max=k_max, temperatures=temperatures, vocab_size=vocab_size,
        )
        for a in range(first, last_anchor + 1, anchor_chunk)
    ]
    return SequenceScores.joined(chunks)


def _score_anchors(model, main_hidden, draft_hidden, a: int, b: int, length: int, *, k_max, temperatures, vocab_size):
    """Scores of anchors a..b-1 (one chunk), each [b-a, K]."""
    anchors = torch.arange(a, b, device=main_hidden.device)
    # Main-head logits for every target index the chunk needs: a+1 .. min(b-1+K, length-2).
    t_lo, t_hi = a + 1, min(b - 1 + k_max, length - 2)
    target_logits = _logits(model, main_hidden[t_lo : t_hi + 1], vocab_size)
    greedy, valid = [], []
    sampled = {t: [] for t in temperatures}
    argmax_draft = {t: [] for t in temperatures}
    for j in range(1, k_max + 1):
        target_index = anchors + j
        valid.append(target_index <= length - 2)  # the drafted token x[i+j+1] exists
        p = target_logits[target_index.clamp(max=t_hi) - t_lo]
        q = _logits(model, draft_hidden[j - 1][a:b], vocab_size)
        greedy.append(greedy_acceptance(p, q))
        for t in temperatures:
            sampled[t].append(sampled_acceptance(p, q, t))
            argmax_draft[t].append(argmax_draft_acceptance(p, q, t))
    return SequenceScores(
        greedy=torch.stack(greedy, -1),
        valid=torch.stack(valid, -1),
        sampled={t: torch.stack(v, -1) for t, v in sampled.items()},
        argmax_draft={t: torch.stack(v, -1) for t, v in argmax_draft.items()},
    )
