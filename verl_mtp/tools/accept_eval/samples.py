"""accept-eval's input: prompt and response token ids, one sample per JSONL line."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

from verl_mtp.tools.accept_eval.options import AcceptEvalError

# JSONL fields, in order of preference. Token ids win over text when both are present.
PROMPT_ID_FIELDS = ("prompt_ids", "prompt_token_ids")
RESPONSE_ID_FIELDS = ("response_ids", "response_token_ids")
# verl's trainer.rollout_data_dir dump writes the decoded prompt as "input", the response as "output".
PROMPT_TEXT_FIELDS = ("prompt", "input")
RESPONSE_TEXT_FIELDS = ("response", "output")


@dataclass
class Sample:
    prompt_ids: list
    response_ids: list
    line: int


def read_samples(path: str, tokenizer_loader=None, max_samples: Optional[int] = None) -> list[Sample]:
    """Prompt/response token ids of each JSONL line.

    Token ids come from ``prompt_ids``/``response_ids`` when present; otherwise the text in
    ``prompt``/``response`` (or verl's rollout dump fields ``input``/``output``) is tokenized with
    the tokenizer ``tokenizer_loader()`` returns (called once, on the first text line).
    """
    if not os.path.isfile(path):
        raise AcceptEvalError(f"data file {path!r} does not exist (expected JSONL of prompts and responses)")
    samples, tokenizer = [], _LazyTokenizer(tokenizer_loader)
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if max_samples is not None and len(samples) >= max_samples:
                break
            where = f"{path}:{line_no}"
            record = _parse_record(line, where)
            sample = _sample_from_ids(record, line_no, where) or _sample_from_text(record, line_no, where, tokenizer)
            samples.append(sample)
    if not samples:
        raise AcceptEvalError(f"data file {path!r} holds no samples")
    return samples


def _parse_record(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise AcceptEvalError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise AcceptEvalError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def _first(record: dict, names: Sequence[str]):
    for name in names:
        if record.get(name) is not None:
            return name, record[name]
    return None, None


def _token_ids(value, name: str, where: str) -> list:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise AcceptEvalError(f"{where}: field {name!r} must be a list of integer token ids")
    return value


def _sample_from_ids(record: dict, line_no: int, where: str) -> Optional[Sample]:
    """The sample of a line that gives response token ids; None for a line without them."""
    r_name, response = _first(record, RESPONSE_ID_FIELDS)
    if r_name is None:
        return None
    p_name, prompt = _first(record, PROMPT_ID_FIELDS)
    if p_name is None:
        raise AcceptEvalError(f"{where}: has {r_name!r} but no prompt ids; give one of {', '.join(PROMPT_ID_FIELDS)}")
    return Sample(_token_ids(prompt, p_name, where), _token_ids(response, r_name, where), line_no)


def _sample_from_text(record: dict, line_no: int, where: str, tokenizer: _LazyTokenizer) -> Sample:
    r_name, response = _first(record, RESPONSE_TEXT_FIELDS)
    if r_name is None:
        present = ", ".join(sorted(record)) or "none"
        raise AcceptEvalError(
            f"{where}: no response; expected token ids in {' / '.join(RESPONSE_ID_FIELDS)} "
            f"or text in {' / '.join(RESPONSE_TEXT_FIELDS)} (fields present: {present})"
        )
    p_name, prompt = _first(record, PROMPT_TEXT_FIELDS)
    if p_name is None:
        raise AcceptEvalError(
            f"{where}: has response text {r_name!r} but no prompt; give one of {', '.join(PROMPT_TEXT_FIELDS)}"
        )
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise AcceptEvalError(f"{where}: fields {p_name!r} and {r_name!r} must be strings")
    encode = tokenizer.get(where)
    # The prompt as at generation time (with the tokenizer's special tokens, e.g. BOS); the
    # response continues it without any.
    prompt_ids = list(encode(prompt, add_special_tokens=True)["input_ids"])
    response_ids = list(encode(response, add_special_tokens=False)["input_ids"])
    return Sample(prompt_ids, response_ids, line_no)


class _LazyTokenizer:
    """The tokenizer ``loader()`` returns, loaded on the first text line (token ids need none)."""

    def __init__(self, loader: Optional[Callable]):
        self.loader, self.tokenizer = loader, None

    def get(self, where: str):
        if self.tokenizer is None:
            if self.loader is None:
                raise AcceptEvalError(f"{where}: text needs a tokenizer; give token ids instead")
            self.tokenizer = self.loader()
        return self.tokenizer


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


def check_token_ids(samples: Iterable[Sample], vocab_size: int) -> None:
    for sample in samples:
        bad = [t for t in sample.prompt_ids + sample.response_ids if not 0 <= t < vocab_size]
        if bad:
            raise AcceptEvalError(
                f"line {sample.line}: token id {bad[0]} is outside the model's vocabulary [0, {vocab_size})"
            )
