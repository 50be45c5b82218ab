"""The whole accept-eval: check the inputs, load the checkpoint into megatron-core, score every
sample and aggregate (see the package doc for what is measured)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional, Sequence

import torch

from verl_mtp.tools.accept_eval.acceptance import ChainAccumulator
from verl_mtp.tools.accept_eval.context import ContextAccumulator, context_summary
from verl_mtp.tools.accept_eval.options import (
    DEFAULT_ANCHOR_CHUNK,
    DEFAULT_CONTEXT_BUCKETS,
    AcceptEvalError,
    check_context_buckets,
    check_options,
    temperature_key,
)
from verl_mtp.tools.accept_eval.samples import Sample, check_token_ids, read_samples, tokenizer_loader
from verl_mtp.tools.accept_eval.scoring import SequenceScores, first_anchor, layer_for_position, score_sequence

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    # per_anchor=True: one entry per scored sample (see per_anchor_values), else None
    anchors: Optional[list] = None
    # acceptance per draft position by context length (see verl_mtp.tools.accept_eval.context)
    by_context: Optional[dict] = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Totals:
    """The chain-rule sums of every acceptance rule over the scored samples, and the counts."""

    k_max: int
    temperatures: Sequence[float]
    context_buckets: Sequence[int] = DEFAULT_CONTEXT_BUCKETS
    greedy: ChainAccumulator = field(init=False)
    sampled: dict = field(init=False)  # temperature -> ChainAccumulator
    argmax_draft: dict = field(init=False)  # temperature -> ChainAccumulator
    sequences: int = 0
    skipped: int = 0
    tokens: int = 0

    def __post_init__(self):
        self.greedy = ChainAccumulator(self.k_max)
        self.sampled = {t: ChainAccumulator(self.k_max) for t in self.temperatures}
        self.argmax_draft = {t: ChainAccumulator(self.k_max) for t in self.temperatures}
        edges, k = self.context_buckets, self.k_max
        self.by_context = {
            "greedy": ContextAccumulator(edges, k),
            "sampled": {t: ContextAccumulator(edges, k) for t in self.temperatures},
            "argmax_draft": {t: ContextAccumulator(edges, k) for t in self.temperatures},
        }

    def add(self, scores: Optional[SequenceScores], response_tokens: int, *, anchor0: int) -> None:
        """``anchor0``: the index of the sequence's first anchor (row 0 of ``scores``), which places
        every drafted token in its context-length bucket."""
        if scores is None:  # response too short to draft anything
            self.skipped += 1
            return
        self.sequences += 1
        self.tokens += response_tokens
        self.greedy.add(scores.greedy, scores.valid)
        for t in self.temperatures:
            self.sampled[t].add(scores.sampled[t], scores.valid)
            self.argmax_draft[t].add(scores.argmax_draft[t], scores.valid)
        context = self.by_context
        context["greedy"].add(scores.greedy, scores.valid, anchor0)
        for t in self.temperatures:
            context["sampled"][t].add(scores.sampled[t], scores.valid, anchor0)
            context["argmax_draft"][t].add(scores.argmax_draft[t], scores.valid, anchor0)

    def context_report(self) -> dict:
        rules = {"greedy": self.by_context["greedy"]}
        for name in ("sampled", "argmax_draft"):
            rules[name] = {temperature_key(t): acc for t, acc in self.by_context[name].items()}
        return context_summary(self.context_buckets, rules)


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
    per_anchor: bool = False,
    context_buckets: Sequence[int] = DEFAULT_CONTEXT_BUCKETS,
) -> AcceptEvalReport:
    """Teacher-forced acceptance of ``model``'s MTP head over ``samples`` (see the package doc).
    ``per_anchor``: also keep every anchor's acceptances in ``report.anchors``.
    ``context_buckets``: starts of the context-length buckets of ``report.by_context``."""
    check_options(k_max, temperatures)
    check_context_buckets(context_buckets)
    mtp = getattr(model, "mtp", None)
    if mtp is None or not len(getattr(mtp, "layers", ())):
        raise AcceptEvalError("the model has no MTP layers (model.mtp is missing); nothing to evaluate")
    model.eval()
    totals = _Totals(k_max, temperatures, tuple(context_buckets))
    anchors = [] if per_anchor else None
    for sample in samples:
        if vocab_size:
            check_token_ids([sample], vocab_size)
        scores = score_sequence(
            model, sample.prompt_ids, sample.response_ids, k_max=k_max, temperatures=temperatures,
            vocab_size=vocab_size, device=device, anchor_chunk=anchor_chunk,
        )
        totals.add(scores, len(sample.response_ids), anchor0=first_anchor(len(sample.prompt_ids)))
        if per_anchor and scores is not None:
            anchors.append(per_anchor_values(sample, scores))
    if totals.sequences == 0:
        raise AcceptEvalError(
            f"no sample has a response of at least 2 tokens ({totals.skipped} too short); nothing to score"
        )
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
        sequences=totals.sequences,
        skipped_short=totals.skipped,
        response_tokens=totals.tokens,
        greedy=totals.greedy.summary(),
        sampled={temperature_key(t): acc.summary() for t, acc in totals.sampled.items()},
        argmax_draft={temperature_key(t): acc.summary() for t, acc in totals.argmax_draft.items()},
        anchors=anchors,
        by_context=totals.context_report(),
    )


def per_anchor_values(sample: Sample, scores: SequenceScores) -> dict:
    """One sample's acceptances, anchor by anchor: row r is anchor index ``first_anchor + r`` of
    prompt+response (the index whose hidden state drafts; position j of the row drafts token
    ``first_anchor + r + j + 1``); ``valid`` is False where that token lies past the response."""
    return {
        "line": sample.line,
        "first_anchor": first_anchor(len(sample.prompt_ids)),
        "valid": scores.valid.tolist(),
        "greedy": scores.greedy.tolist(),
        "sampled": {temperature_key(t): v.tolist() for t, v in scores.sampled.items()},
        "argmax_draft": {temperature_key(t): v.tolist() for t, v in scores.argmax_draft.items()},
    }


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
    per_anchor: bool = False,
    context_buckets: Sequence[int] = DEFAULT_CONTEXT_BUCKETS,
) -> AcceptEvalReport:
    """Load ``checkpoint`` through mbridge into megatron-core and evaluate it on ``data``.

    The model runs where ``load_hf_model`` puts it: the GPU when torch sees one, else the CPU.
    Inputs are checked (options, data file, the checkpoint's MTP head) before the model loads.
    """
    from verl_mtp.models.families import text_config

    check_options(k_max, temperatures)
    check_context_buckets(context_buckets)
    dtype = _resolve_dtype(dtype)
    if max_samples is not None and max_samples < 1:
        raise AcceptEvalError(f"--max-samples must be >= 1, got {max_samples}")
    config, family = check_checkpoint(checkpoint)
    samples = read_samples(data, tokenizer_loader(tokenizer or checkpoint), max_samples)
    declared_vocab = text_config(config).get("vocab_size")
    if isinstance(declared_vocab, int):
        check_token_ids(samples, declared_vocab)  # before the (slow) load
    loaded = _load(checkpoint, dtype)
    model = loaded.model
    vocab_size = (loaded.hf_config or {}).get("vocab_size") or config.get("vocab_size")
    return evaluate(
        model, samples, k_max=k_max, temperatures=temperatures, vocab_size=vocab_size,
        device=next(model.parameters()).device, checkpoint=checkpoint, data=data, family=family.name,
        anchor_chunk=anchor_chunk, per_anchor=per_anchor, context_buckets=context_buckets,
    )


def _resolve_dtype(dtype: str) -> str:
    if dtype == "auto":
        return "bfloat16" if torch.cuda.is_available() else "float32"
    if dtype not in DTYPES:
        raise AcceptEvalError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return dtype


def check_checkpoint(checkpoint: str):
    """``(config.json, family)`` of a checkpoint that has an MTP head a bridge can build; else
    AcceptEvalError with the reason (nothing is loaded)."""
    from verl_mtp.models.families import UnknownFamilyError, detect_family, mtp_depths

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
    return config, family


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


def _load(checkpoint: str, dtype: str):
    from verl_mtp.local_megatron.hf_model import load_hf_model

    if torch.cuda.is_available():
        _seed_cuda_rng()  # before the build: megatron initialises GPU parameters through it
    try:
        return load_hf_model(checkpoint, dtype=DTYPES[dtype])
    except (ValueError, KeyError, FileNotFoundError) as exc:  # config / weights that do not fit the bridge
        raise AcceptEvalError(f"cannot load {checkpoint!r} into megatron-core: {exc}") from exc


def _seed_cuda_rng() -> None:
    # megatron's attention and its GPU initialisation fork the CUDA RNG tracker, which must hold
    # the model-parallel state (the parallel state must exist first).
    from megatron.core import tensor_parallel

    from verl_mtp.local_megatron.single_process import init_single_process_megatron

    init_single_process_megatron()
    tracker = tensor_parallel.get_cuda_rng_tracker()
    if not tracker.get_states():
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
