"""accept-eval's output: the report as a table and as a plot."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

from verl_mtp.tools.accept_eval.options import AcceptEvalError, temperature_key

if TYPE_CHECKING:
    from verl_mtp.tools.accept_eval.run import AcceptEvalReport


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _series(report: AcceptEvalReport) -> list[tuple[str, dict]]:
    """(label, summary) of every acceptance rule in the report, greedy first."""
    out = [("greedy", report.greedy)]
    for t in report.temperatures:
        out.append((f"T={temperature_key(t)} min(p,q)", report.sampled[temperature_key(t)]))
        out.append((f"T={temperature_key(t)} p(argmax q)", report.argmax_draft[temperature_key(t)]))
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
    if report.by_context is not None:
        lines += ["", *_context_lines(report)]
    return "\n".join(lines) + "\n"


def _tokens_label(n) -> str:
    if n is None:
        return "inf"
    return f"{n // 1024}k" if n and n % 1024 == 0 else str(n)


def _context_cell(stats: dict) -> tuple[str, bool]:
    """"mean +-stderr"; marked * where one sequence leaves only the iid error."""
    if stats["mean"] is None:
        return "-", False
    if stats["stderr"] is None:  # a single token
        return f"{stats['mean']:.3f}", False
    single = stats["stderr_clustered"] is None
    return f"{stats['mean']:.3f} +-{stats['stderr']:.3f}" + ("*" if single else ""), single


def _context_lines(report: AcceptEvalReport) -> list[str]:
    """Acceptance per draft position by context-length bucket; empty buckets say so (never 0)."""
    context, k = report.by_context, report.num_speculative_tokens
    buckets = context["buckets"]
    used = [b for b, bucket in enumerate(buckets) if any(bucket["tokens"])]
    last = used[-1] if used else -1
    labels = ["greedy"]
    for t in report.temperatures:
        labels += [f"T={temperature_key(t)} min(p,q)", f"T={temperature_key(t)} p(argmax q)"]
    rows, starred = [], False
    for bucket in buckets[: last + 1]:
        span = f"[{_tokens_label(bucket['start'])}, {_tokens_label(bucket['end'])})"
        if not any(bucket["tokens"]):
            rows.append([span, "-", "0", "0", *("empty" for _ in labels)])
            continue
        for j in range(k):
            series = [bucket["greedy"][j]]
            for t in report.temperatures:
                series += [bucket["sampled"][temperature_key(t)][j], bucket["argmax_draft"][temperature_key(t)][j]]
            cells = []
            for stats in series:
                cell, star = _context_cell(stats)
                cells.append(cell)
                starred |= star
            rows.append([span, str(j + 1), str(bucket["tokens"][j]), str(bucket["sequences"][j]), *cells])
    lines = [
        "acceptance by context length (tokens before the drafted token), per draft position: "
        "mean +-standard error (the larger of the iid and the sequence-clustered one)",
        *_table(["context", "pos", "tokens", "seqs", *labels], rows),
    ]
    if starred:
        lines.append("* one sequence in the bucket: the error treats its tokens as independent (an underestimate)")
    if last + 1 < len(buckets):
        lines.append(f"no drafted tokens at context >= {_tokens_label(buckets[last + 1]['start'])} "
                     f"({len(buckets) - last - 1} empty buckets not shown)")
    return lines


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
