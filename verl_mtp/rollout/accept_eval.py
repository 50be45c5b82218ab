"""Offline speculative-acceptance evaluation of an MTP head (``verl-mtp accept-eval``).

Given a Hugging Face checkpoint with an MTP head and prompts+responses, the model runs
teacher-forced over each prompt+response in megatron-core, and every response position is
scored as a speculative-decoding *anchor*, as an engine would draft from it:

* megatron indexing (``verl_mtp.megatron.mtp_log_probs``): the main head at index i predicts
  ``x[i+1]``; MTP depth k at index i predicts ``x[i+k+1]`` from the depth k-1 (or trunk) hidden
  state at i and the embedding of ``x[i+k]``.
* a verify step that has just committed ``x[i+1]`` drafts K tokens: draft position j (1..K) is
  MTP depth j at index i, proposing ``x[i+j+1]``; the target that verifies it is the main head at
  index i+j. Anchors run from the last prompt token (the first decode step after prefill) to the
  third-to-last token, so every drafted token is a response token.
* teacher forcing: later draft positions are fed the data's tokens, not drafted ones. Under the
  chain rule (a position counts only if all earlier ones were accepted) an accepted draft equals
  the data's token when the responses are greedy outputs of this model; for sampled rollouts
  the acceptance is measured along the data's own trajectories, and multiplying per-position
  acceptances is the usual independence approximation of the speculative-sampling analysis.

Acceptance of one draft position, per anchor, with p the target and q the draft distribution:

* ``greedy``: argmax q == argmax p (greedy decoding; draft and target both take the argmax).
* ``sampled`` at temperature T: sum_v min(p_T(v), q_T(v)), the probability that speculative
  sampling (draft sampled from q_T, accepted with min(1, p_T/q_T)) keeps the draft.
* ``argmax_draft`` at temperature T: p_T(argmax q), the probability that the target keeps a
  greedily drafted token under the same rejection rule with a one-hot draft distribution, which
  is how vLLM's v1 rejection sampler treats MTP drafts (it is given no draft probabilities).

Reported per draft position j (which is MTP depth j where the head has that many depths):
``marginal`` = mean acceptance of position j over anchors (the depth's own quality),
``conditional`` = acceptance of j given 1..j-1 accepted; and for K = 1..K_max the expected number
of accepted drafts E[sum_{j<=K} prod_{i<=j} a_i] and tokens per verify step (1 + that, the
engines' "acceptance length"). An anchor enters position j (and K) only if ``x[i+j+1]`` lies
inside the response, so the end of a response never counts as a rejection.

Heads with fewer depths D than K: vLLM runs MTP layer ``step % D`` at draft step ``step`` and
SGLang / megatron's ``mtp_use_repeated_layer`` repeat the single layer, so draft position j uses
layer ``(j-1) % D``, fed with the previous position's output hidden state and the next
embedding, exactly as megatron's MTP block chains its depths (the layer forward is megatron's own).
That output hidden state is the one after the layer's final norm, as in megatron's training
chain, vLLM's MiMo MTP layer and SGLang's NextN layers; an engine that passed the pre-norm state
on would differ from this estimate at positions beyond the head's depth count.

Not modelled: top-p / top-k truncation, tree drafting (SGLang topk > 1), and the change of the
conditioning prefix in sampling mode (see teacher forcing above). Text inputs are re-tokenized;
verl's rollout dump decodes with ``skip_special_tokens=True``, so token ids are the exact input.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import types
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional, Sequence

import torch

# JSONL fields, in order of preference. Token ids win over text when both are present.
PROMPT_ID_FIELDS = ("prompt_ids", "prompt_token_ids")
RESPONSE_ID_FIELDS = ("response_ids", "response_token_ids")
# verl's trainer.rollout_data_dir dump writes the decoded prompt as "input", the response as "output".
PROMPT_TEXT_FIELDS = ("prompt", "input")
RESPONSE_TEXT_FIELDS = ("response", "output")

METRICS = ("greedy", "sampled", "argmax_draft")
DEFAULT_ANCHOR_CHUNK = 256  # anchors whose vocabulary-sized logits are alive at once


class AcceptEvalError(ValueError):
    """Bad input to the evaluator (the CLI prints it and exits 2)."""


# ----------------------------------------------------------------------------------------------
# Acceptance of one draft position (pure math on logits)


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


# ----------------------------------------------------------------------------------------------
# Chain-rule aggregation over anchors


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


# ----------------------------------------------------------------------------------------------
# Samples


@dataclass
class Sample:
    prompt_ids: list
    response_ids: list
    line: int


def _first(record: dict, names: Sequence[str]):
    for name in names:
        if record.get(name) is not None:
            return name, record[name]
    return None, None


def _token_ids(value, name: str, line: int, path: str) -> list:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise AcceptEvalError(f"{path}:{line}: field {name!r} must be a list of integer token ids")
    return value


def read_samples(path: str, tokenizer_loader=None, max_samples: Optional[int] = None) -> list[Sample]:
    """Prompt/response token ids of each JSONL line.

    Token ids come from ``prompt_ids``/``response_ids`` when present; otherwise the text in
    ``prompt``/``response`` (or verl's rollout dump fields ``input``/``output``) is tokenized with
    the tokenizer ``tokenizer_loader()`` returns (called once, on the first text line).
    """
    if not os.path.isfile(path):
        raise AcceptEvalError(f"data file {path!r} does not exist (expected JSONL of prompts and responses)")
    samples, tokenizer = [], None
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if max_samples is not None and len(samples) >= max_samples:
                break
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise AcceptEvalError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise AcceptEvalError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            r_name, response = _first(record, RESPONSE_ID_FIELDS)
            if r_name is not None:
                p_name, prompt = _first(record, PROMPT_ID_FIELDS)
                if p_name is None:
                    raise AcceptEvalError(
                        f"{path}:{line_no}: has {r_name!r} but no prompt ids; give one of {', '.join(PROMPT_ID_FIELDS)}"
                    )
                prompt_ids = _token_ids(prompt, p_name, line_no, path)
                samples.append(Sample(prompt_ids, _token_ids(response, r_name, line_no, path), line_no))
                continue
            r_name, response = _first(record, RESPONSE_TEXT_FIELDS)
            if r_name is None:
                present = ", ".join(sorted(record)) or "none"
                raise AcceptEvalError(
                    f"{path}:{line_no}: no response; expected token ids in {' / '.join(RESPONSE_ID_FIELDS)} "
                    f"or text in {' / '.join(RESPONSE_TEXT_FIELDS)} (fields present: {present})"
                )
            p_name, prompt = _first(record, PROMPT_TEXT_FIELDS)
            if p_name is None:
                raise AcceptEvalError(
                    f"{path}:{line_no}: has response text {r_name!r} but no prompt; give one of "
                    f"{', '.join(PROMPT_TEXT_FIELDS)}"
                )
            if not isinstance(prompt, str) or not isinstance(response, str):
                raise AcceptEvalError(f"{path}:{line_no}: fields {p_name!r} and {r_name!r} must be strings")
            if tokenizer is None:
                if tokenizer_loader is None:
                    raise AcceptEvalError(f"{path}:{line_no}: text needs a tokenizer; give token ids instead")
                tokenizer = tokenizer_loader()
            # The prompt as at generation time (with the tokenizer's special tokens, e.g. BOS); the
            # response continues it without any.
            prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
            response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
            samples.append(Sample(prompt_ids, response_ids, line_no))
    if not samples:
        raise AcceptEvalError(f"data file {path!r} holds no samples")
    return samples


def tokenizer_loader(path: str):
    """A loader for the tokenizer at ``path`` (checkpoint dir or --tokenizer) that fails clearly."""

    def load():
        names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
        if not (os.path.isdir(path) and any(os.path.exists(os.path.join(path, n)) for n in names)):
            raise AcceptEvalError(
                f"the data holds text but {path!r} has no tokenizer (none of {', '.join(names)}); "
                "pass --tokenizer PATH or give token ids (prompt_ids / response_ids)"
            )
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(path)
        except Exception as exc:  # transformers raises many types for unreadable tokenizers
            raise AcceptEvalError(f"cannot load the tokenizer at {path!r}: {exc}") from exc

    return load


# ----------------------------------------------------------------------------------------------
# Teacher-forced forward through megatron-core


def layer_for_position(num_layers: int, k_max: int) -> list[int]:
    """MTP layer (0-based) that drafts position j = 1..k_max: ``(j-1) % num_layers``."""
    return [(j - 1) % num_layers for j in range(1, k_max + 1)]


def _megatron_device_context(device: torch.device):
    if device.type == "cpu":
        from verl_mtp.megatron.single_process import cpu_megatron

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
    from verl_mtp.megatron.single_process import causal_mask

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
    first_anchor, last_anchor = max(start - 1, 0), length - 3  # anchor i drafts x[i+2] first
    if last_anchor < first_anchor:
        return None
    num_layers = len(model.mtp.layers)
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    main_hidden, draft_hidden = teacher_forced_hidden(model, input_ids, layer_for_position(num_layers, k_max))

    greedy, valid = [], []
    sampled = {t: [] for t in temperatures}
    argmax_draft = {t: [] for t in temperatures}
    for a in range(first_anchor, last_anchor + 1, anchor_chunk):
        b = min(a + anchor_chunk, last_anchor + 1)
        anchors = torch.arange(a, b, device=device)
        # Main-head logits for every target index the chunk needs: a+1 .. min(b-1+K, length-2).
        t_lo, t_hi = a + 1, min(b - 1 + k_max, length - 2)
        target_logits = _logits(model, main_hidden[t_lo : t_hi + 1], vocab_size)
        chunk_greedy, chunk_valid = [], []
        chunk_sampled = {t: [] for t in temperatures}
        chunk_argmax = {t: [] for t in temperatures}
        for j in range(1, k_max + 1):
            target_index = anchors + j
            ok = target_index <= length - 2  # the drafted token x[i+j+1] exists
            rows = (target_index.clamp(max=t_hi) - t_lo)
            p = target_logits[rows]
            q = _logits(model, draft_hidden[j - 1][a:b], vocab_size)
            chunk_valid.append(ok)
            chunk_greedy.append(greedy_acceptance(p, q))
            for t in temperatures:
                chunk_sampled[t].append(sampled_acceptance(p, q, t))
                chunk_argmax[t].append(argmax_draft_acceptance(p, q, t))
        greedy.append(torch.stack(chunk_greedy, -1))
        valid.append(torch.stack(chunk_valid, -1))
        for t in temperatures:
            sampled[t].append(torch.stack(chunk_sampled[t], -1))
            argmax_draft[t].append(torch.stack(chunk_argmax[t], -1))
    return SequenceScores(
        greedy=torch.cat(greedy).cpu(),
        valid=torch.cat(valid).cpu(),
        sampled={t: torch.cat(v).cpu() for t, v in sampled.items()},
        argmax_draft={t: torch.cat(v).cpu() for t, v in argmax_draft.items()},
    )


# ----------------------------------------------------------------------------------------------
# The whole evaluation


@dataclass
class AcceptEvalReport:
    checkpoint: str
    data: str
    family: Optional[str]
    device: str
    dtype: str
    mtp_layers: int
    num_speculative_tokens: int
    layer_for_position: list
    temperatures: list
    sequences: int
    skipped_short: int
    response_tokens: int
    greedy: dict
    sampled: dict  # str(temperature) -> summary
    argmax_draft: dict  # str(temperature) -> summary

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate(
    model,
    samples: Iterable[Sample],
    *,
    k_max: int,
    temperatures: Sequence[float] = (1.0,),
    vocab_size: Optional[int] = None,
    device: torch.device = torch.device("cpu"),
    checkpoint: str = "",
    data: str = "",
    family: Optional[str] = None,
    anchor_chunk: int = DEFAULT_ANCHOR_CHUNK,
) -> AcceptEvalReport:
    """Teacher-forced acceptance of ``model``'s MTP head over ``samples`` (see the module doc)."""
    check_options(k_max, temperatures)
    mtp = getattr(model, "mtp", None)
    if mtp is None or not len(getattr(mtp, "layers", ())):
        raise AcceptEvalError("the model has no MTP layers (model.mtp is missing); nothing to evaluate")
    model.eval()
    greedy = ChainAccumulator(k_max)
    sampled = {t: ChainAccumulator(k_max) for t in temperatures}
    argmax_draft = {t: ChainAccumulator(k_max) for t in temperatures}
    sequences = skipped = tokens = 0
    for sample in samples:
        if vocab_size:
            _check_token_ids([sample], vocab_size)
        scores = score_sequence(
            model, sample.prompt_ids, sample.response_ids, k_max=k_max, temperatures=temperatures,
            vocab_size=vocab_size, device=device, anchor_chunk=anchor_chunk,
        )
        if scores is None:
            skipped += 1
            continue
        sequences += 1
        tokens += len(sample.response_ids)
        greedy.add(scores.greedy, scores.valid)
        for t in temperatures:
            sampled[t].add(scores.sampled[t], scores.valid)
            argmax_draft[t].add(scores.argmax_draft[t], scores.valid)
    if sequences == 0:
        raise AcceptEvalError(f"no sample has a response of at least 2 tokens ({skipped} too short); nothing to score")
    return AcceptEvalReport(
        checkpoint=checkpoint,
        data=data,
        family=family,
        device=str(device),
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        mtp_layers=len(mtp.layers),
        num_speculative_tokens=k_max,
        layer_for_position=layer_for_position(len(mtp.layers), k_max),
        temperatures=list(temperatures),
        sequences=sequences,
        skipped_short=skipped,
        response_tokens=tokens,
        greedy=greedy.summary(),
        sampled={_t_key(t): acc.summary() for t, acc in sampled.items()},
        argmax_draft={_t_key(t): acc.summary() for t, acc in argmax_draft.items()},
    )


def _check_token_ids(samples: Iterable[Sample], vocab_size: int) -> None:
    for sample in samples:
        bad = [t for t in sample.prompt_ids + sample.response_ids if not 0 <= t < vocab_size]
        if bad:
            raise AcceptEvalError(
                f"line {sample.line}: token id {bad[0]} is outside the model's vocabulary [0, {vocab_size})"
            )


def _t_key(t: float) -> str:
    return f"{t:g}"


def check_options(k_max: Any, temperatures: Sequence[Any]) -> None:
    if isinstance(k_max, bool) or not isinstance(k_max, int) or k_max < 1:
        raise AcceptEvalError(f"--num-speculative-tokens must be an integer >= 1, got {k_max!r}")
    if not temperatures:
        raise AcceptEvalError("at least one --temperature is needed")
    for t in temperatures:
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
            raise AcceptEvalError(
                f"--temperature must be a finite number > 0, got {t!r} (greedy acceptance is always reported)"
            )


def _checkpoint_config(path: str) -> dict:
    if not os.path.isdir(path):
        raise AcceptEvalError(f"checkpoint {path!r} is not a directory (expected a Hugging Face checkpoint)")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise AcceptEvalError(f"checkpoint {path!r} has no config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise AcceptEvalError(f"cannot read {config_path!r}: {exc}") from exc


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run_accept_eval(
    checkpoint: str,
    data: str,
    *,
    k_max: int = 3,
    temperatures: Sequence[float] = (1.0,),
    dtype: str = "auto",
    max_samples: Optional[int] = None,
    tokenizer: Optional[str] = None,
    anchor_chunk: int = DEFAULT_ANCHOR_CHUNK,
) -> AcceptEvalReport:
    """Load ``checkpoint`` through mbridge into megatron-core and evaluate it on ``data``.

    The model runs where ``load_hf_model`` puts it: the GPU when torch sees one, else the CPU.
    Inputs are checked (options, data file, the checkpoint's MTP head) before the model loads.
    """
    from verl_mtp.models.families import UnknownFamilyError, detect_family, mtp_depths, text_config

    check_options(k_max, temperatures)
    if dtype == "auto":
        dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    if dtype not in DTYPES:
        raise AcceptEvalError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    if max_samples is not None and max_samples < 1:
        raise AcceptEvalError(f"--max-samples must be >= 1, got {max_samples}")
    config = _checkpoint_config(checkpoint)
    try:
        family = detect_family(config)
    except UnknownFamilyError as exc:
        raise AcceptEvalError(f"checkpoint {checkpoint!r}: {exc}") from None
    if mtp_depths(config) < 1:
        raise AcceptEvalError(
            f"checkpoint {checkpoint!r} has no MTP head: config.json declares no MTP depths "
            f"({family.depth_key} missing or 0); graft one with `verl-mtp ckpt graft`"
        )
    check_buildable(checkpoint, config, family)
    samples = read_samples(data, tokenizer_loader(tokenizer or checkpoint), max_samples)
    declared_vocab = text_config(config).get("vocab_size")
    if isinstance(declared_vocab, int):
        _check_token_ids(samples, declared_vocab)  # before the (slow) load

    from verl_mtp.models.bridges import load_hf_model

    if torch.cuda.is_available():
        _seed_cuda_rng()  # before the build: megatron initialises GPU parameters through it
    try:
        loaded = load_hf_model(checkpoint, dtype=DTYPES[dtype])
    except (ValueError, KeyError, FileNotFoundError) as exc:  # config / weights that do not fit the bridge
        raise AcceptEvalError(f"cannot load {checkpoint!r} into megatron-core: {exc}") from exc
    model = loaded.model
    torch_device = next(model.parameters()).device
    vocab_size = (loaded.hf_config or {}).get("vocab_size") or config.get("vocab_size")
    return evaluate(
        model, samples, k_max=k_max, temperatures=temperatures, vocab_size=vocab_size, device=torch_device,
        checkpoint=checkpoint, data=data, family=family.name, anchor_chunk=anchor_chunk,
    )


def check_buildable(checkpoint: str, config: dict, family) -> None:
    """Refuse, before anything loads, a checkpoint no bridge can build (Qwen3-Next / Qwen3.5
    trunks) or whose config.json lacks a key that sets tensor shapes; keys with a family default
    (attention_dropout, rms_norm_eps, rope_theta, ...) are filled by the bridge's config class."""
    from verl_mtp.models.bridges import bridge_key, missing_structural_keys

    try:
        key = bridge_key(config, family)
    except ValueError as exc:
        raise AcceptEvalError(f"checkpoint {checkpoint!r}: {exc}") from None
    missing = missing_structural_keys(config, key)
    if missing:
        raise AcceptEvalError(
            f"checkpoint {checkpoint!r}: config.json lacks {', '.join(repr(k) for k in missing)}, which "
            f"{family.title} needs to build the model (tensor shapes or layer layout; no default is assumed)"
        )


def _seed_cuda_rng() -> None:
    # megatron's attention and its GPU initialisation fork the CUDA RNG tracker, which must hold
    # the model-parallel state (the parallel state must exist first).
    from megatron.core import tensor_parallel

    from verl_mtp.megatron.single_process import init_single_process_megatron

    init_single_process_megatron()
    tracker = tensor_parallel.get_cuda_rng_tracker()
    if not tracker.get_states():
        tensor_parallel.model_parallel_cuda_manual_seed(1234)


# ----------------------------------------------------------------------------------------------
# Output


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _series(report: AcceptEvalReport) -> list[tuple[str, dict]]:
    """(label, summary) of every acceptance rule in the report, greedy first."""
    out = [("greedy", report.greedy)]
    for t in report.temperatures:
        out.append((f"T={_t_key(t)} min(p,q)", report.sampled[_t_key(t)]))
        out.append((f"T={_t_key(t)} p(argmax q)", report.argmax_draft[_t_key(t)]))
    return out


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    return ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in [header, *rows]]


def render_report(report: AcceptEvalReport) -> str:
    reused = " (reused)" if report.num_speculative_tokens > report.mtp_layers else ""
    lines = [
        f"checkpoint: {report.checkpoint}" + (f" ({report.family})" if report.family else "")
        + f", on {report.device} in {report.dtype}",
        f"data: {report.data}: {report.sequences} sequences, {report.response_tokens} response tokens"
        + (f", {report.skipped_short} skipped (response < 2 tokens)" if report.skipped_short else ""),
        f"MTP layers: {report.mtp_layers}; draft position -> layer: "
        + ", ".join(f"{j + 1}->{layer}" for j, layer in enumerate(report.layer_for_position)) + reused,
        "",
        "acceptance per draft position: marginal (the position alone) / conditional (given all earlier accepted)",
    ]
    series = _series(report)
    header = ["pos", "layer", "anchors", *(label for label, _ in series)]
    rows = []
    for j in range(report.num_speculative_tokens):
        cells = [str(j + 1), str(report.layer_for_position[j]), str(report.greedy["positions"][j]["anchors"])]
        for _, summary in series:
            p = summary["positions"][j]
            cells.append(f"{_fmt(p['marginal'])} / {_fmt(p['conditional'])}")
        rows.append(cells)
    lines += _table(header, rows)
    lines += ["", "expected accepted drafts per verify step / tokens per step (1 + accepted), K = draft tokens"]
    header = ["K", *(label for label, _ in series)]
    rows = []
    for j in range(report.num_speculative_tokens):
        cells = [str(j + 1)]
        for _, summary in series:
            cells.append(f"{_fmt(summary['expected_accepted'][j])} / {_fmt(summary['tokens_per_step'][j])}")
        rows.append(cells)
    lines += _table(header, rows)
    return "\n".join(lines) + "\n"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise AcceptEvalError(f"--plot needs matplotlib ({exc}); pip install matplotlib, or drop --plot") from None
    return plt


def check_plot_target(path: str) -> None:
    """Fail before the evaluation, not after it, when the plot cannot be written."""
    _pyplot()
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise AcceptEvalError(f"--plot {path!r}: folder {folder!r} does not exist")


def plot_report(report: AcceptEvalReport, path: str) -> None:
    """Acceptance per draft position and expected accepted drafts per K (needs matplotlib)."""
    plt = _pyplot()
    ks = list(range(1, report.num_speculative_tokens + 1))

    def nan(values):  # undefined ratios (nothing accepted before) are gaps in the plot
        return [math.nan if v is None else v for v in values]

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label, summary in _series(report):
        left.plot(ks, nan(p["conditional"] for p in summary["positions"]), marker="o", label=label)
        right.plot(ks, nan(summary["expected_accepted"]), marker="o", label=label)
    left.set(xlabel="draft position", ylabel="acceptance given earlier accepted", ylim=(0, 1.05), xticks=ks)
    right.set(xlabel="num_speculative_tokens K", ylabel="expected accepted drafts", xticks=ks)
    right.set_ylim(bottom=0)
    left.legend(fontsize=8)
    fig.suptitle(f"MTP acceptance: {os.path.basename(os.path.normpath(report.checkpoint)) or report.checkpoint}")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise AcceptEvalError(f"--plot {path!r}: cannot write it ({exc})") from exc
    finally:
        plt.close(fig)
