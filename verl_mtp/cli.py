"""The ``verl-mtp`` command."""

from __future__ import annotations

import argparse
import sys

# Distributions whose versions `--version` reports, read from their metadata (importing them
# would cost seconds and, for verl, load the plugin).
_VERSION_OF = ("verl", "megatron-core", "torch")


def _version_text() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from verl_mtp.version import __version__

    lines = [f"verl-mtp {__version__}"]
    for dist in _VERSION_OF:
        try:
            found = version(dist)
        except PackageNotFoundError:
            found = "not installed"
        lines.append(f"  {dist} {found}")
    return "\n".join(lines)


class _VersionAction(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(_version_text())
        parser.exit()


def _usage_error(parser: argparse.ArgumentParser):
    """A command group called without its subcommand: its help on stderr, exit 2."""

    def run(args: argparse.Namespace) -> int:
        commands = [name for a in parser._actions if isinstance(a, argparse._SubParsersAction) for name in a.choices]
        parser.print_help(sys.stderr)
        print(f"\n{parser.prog}: error: a command is required: one of {', '.join(commands)}", file=sys.stderr)
        return 2

    return run


def _explain(args: argparse.Namespace) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from verl_mtp.config import MtpConfigError
    from verl_mtp.tools.explain import build_plan, compose_run_config, plan_as_json, render_plan

    try:
        config = compose_run_config(args.overrides, config_name=args.config_name)
        plan = build_plan(config)
    except MtpConfigError as exc:
        print(f"verl-mtp: invalid MTP config: {exc}", file=sys.stderr)
        return 2
    except (HydraException, OmegaConfBaseException) as exc:
        print(f"verl-mtp: the overrides do not compose: {exc}", file=sys.stderr)
        return 2
    print(plan_as_json(plan) if args.json else render_plan(plan), end="" if not args.json else "\n")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from verl_mtp.tools.demo import DemoOptions, DemoOptionsError, run_demo

    regimes = tuple(r for r in args.regimes.split(",") if r)
    try:
        options = DemoOptions(
            steps=args.steps, regimes=regimes, seed=args.seed,
            out_dir=args.out, warmup_steps=args.warmup_steps, figure=not args.no_figure,
        )
    except DemoOptionsError as exc:
        print(f"verl-mtp demo: {exc}", file=sys.stderr)
        return 2
    run_demo(options)
    return 0


def _ckpt(args: argparse.Namespace) -> int:
    import json

    from verl_mtp import ckpt

    name = f"verl-mtp ckpt {args.ckpt_command}"
    try:
        if args.ckpt_command == "inspect":
            report = ckpt.inspect_checkpoint(args.dir)
            print(json.dumps(report.as_dict(), indent=2) if args.json else ckpt.render_inspect(report).rstrip("\n"))
            return 0 if report.complete else 1
        if args.ckpt_command == "extract":
            try:
                max_shard = ckpt.parse_size(args.max_shard_size)
            except ValueError as exc:
                raise ckpt.CkptError(f"--max-shard-size {exc}") from exc
            result = ckpt.extract_mtp(args.src, args.out, overwrite=args.overwrite, max_shard_bytes=max_shard,
                                      allow_incomplete_head=args.allow_incomplete_head)
        elif args.ckpt_command == "stitch":
            result = ckpt.stitch_mtp(args.verifier, args.donor, args.out, overwrite=args.overwrite, link=args.link,
                                     allow_incomplete_head=args.allow_incomplete_head)
        else:
            result = ckpt.graft_mtp(args.base, args.rl, args.out, overwrite=args.overwrite, link=args.link,
                                    allow_incomplete_head=args.allow_incomplete_head)
    except ckpt.CkptError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{name}: I/O error: {exc}; the output directory was not created", file=sys.stderr)
        return 1
    print(json.dumps(result.as_dict(), indent=2) if args.json else ckpt.render_result(result).rstrip("\n"))
    return 0


_LINK = ("--link", dict(action="store_true", help="hard-link unchanged shards instead of copying them"))

# (command, help, description, positional arguments as (name, help), options as (flag, add_argument keywords))
_CKPT_COMMANDS = (
    (
        "inspect", "list the MTP tensors and check the head is complete",
        "Print the family, declared MTP depths, the MTP tensors per depth and whether the head is "
        "complete. Exit 0 complete, 1 incomplete, 2 unreadable checkpoint.",
        (("dir", "checkpoint directory (config.json + safetensors)"),), (),
    ),
    (
        "extract", "write the MTP head (+ embedding, lm_head) as a checkpoint of its own",
        "Write SRC's MTP tensors and the trunk tensors a drafter shares (embedding, lm_head) to OUT "
        "as sharded safetensors with an index, a copy of config.json and mtp_extract.json.",
        (("src", None), ("out", None)),
        (("--max-shard-size", dict(default="5GB", help="largest output shard (default 5GB)")),),
    ),
    (
        "stitch", "copy VERIFIER with its MTP tensors replaced by DONOR's",
        "Write OUT = VERIFIER with every MTP tensor taken from DONOR (same family, names, shapes, "
        "dtypes; DONOR may be an `extract` output). Shards without MTP tensors are copied unchanged.",
        (("verifier", None), ("donor", None), ("out", None)), (_LINK,),
    ),
    (
        "graft", "put BASE's MTP head into an RL-trained checkpoint",
        "Write OUT = RL with BASE's MTP head: RL's MTP tensors are replaced, dropped ones are added as "
        "a new shard, and a dropped MTP depth key is restored in config.json.",
        (("base", None), ("rl", None), ("out", None)), (_LINK,),
    ),
)


def _add_ckpt_parser(sub) -> None:
    ckpt = sub.add_parser(
        "ckpt",
        help="inspect, extract, stitch or graft the MTP head of a Hugging Face checkpoint",
        description="Tools for the MTP head of Hugging Face safetensors checkpoints (MiMo, DeepSeek-V3, GLM-4.5, "
        "Qwen3-Next, Qwen3.5). They read shard headers and stream tensors; outputs appear only when complete.",
    )
    cmds = ckpt.add_subparsers(dest="ckpt_command", metavar="{inspect,extract,stitch,graft}")
    ckpt.set_defaults(func=_usage_error(ckpt))
    for name, help_text, description, positionals, options in _CKPT_COMMANDS:
        p = cmds.add_parser(name, help=help_text, description=description)
        for arg, arg_help in positionals:
            p.add_argument(arg, help=arg_help)
        for flag, keywords in options:
            p.add_argument(flag, **keywords)
        p.add_argument("--json", action="store_true", help="print the report as JSON")
        if name != "inspect":  # the commands that write a checkpoint
            p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
            p.add_argument("--allow-incomplete-head", action="store_true",
                           help="carry an MTP head with missing, unexpected or misshapen tensors as it is "
                           "(refused otherwise; `inspect` lists the problems)")
        p.set_defaults(func=_ckpt)


def _accept_eval(args: argparse.Namespace) -> int:
    import json

    from verl_mtp.tools.accept_eval.options import DEFAULT_CONTEXT_BUCKETS, AcceptEvalError, parse_context_buckets
    from verl_mtp.tools.accept_eval.report import check_plot_target, plot_report, render_report
    from verl_mtp.tools.accept_eval.run import run_accept_eval

    try:
        buckets = DEFAULT_CONTEXT_BUCKETS if args.context_buckets is None else parse_context_buckets(args.context_buckets)
        if args.plot:
            check_plot_target(args.plot)
        report = run_accept_eval(
            args.checkpoint, args.data, k_max=args.num_speculative_tokens,
            temperatures=tuple(args.temperature or (1.0,)), dtype=args.dtype,
            max_samples=args.max_samples, tokenizer=args.tokenizer, context_buckets=buckets,
        )
        if args.plot:
            plot_report(report, args.plot)
    except AcceptEvalError as exc:
        print(f"verl-mtp accept-eval: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.as_dict(), indent=2) if args.json else render_report(report).rstrip("\n"))
    return 0


def _add_accept_eval_parser(sub) -> None:
    p = sub.add_parser(
        "accept-eval",
        help="offline speculative acceptance of a checkpoint's MTP head on prompts+responses",
        description="Load a Hugging Face checkpoint with an MTP head into megatron-core (GPU if torch sees one, "
        "else CPU), run it teacher-forced over each prompt+response of a JSONL file and report the expected "
        "acceptance of 1..K speculative tokens over response tokens: greedy, and at each temperature T both "
        "sum_v min(p,q) (draft sampled) and p(argmax q) (draft greedy), per draft position and as expected "
        "accepted drafts per verify step. JSONL lines hold prompt_ids/response_ids, or text in prompt/response "
        "(or input/output, as verl's trainer.rollout_data_dir writes them) tokenized with the checkpoint's tokenizer.",
    )
    p.add_argument("checkpoint", help="Hugging Face checkpoint directory (config.json + safetensors)")
    p.add_argument("data", help="JSONL of prompts and responses")
    p.add_argument("-k", "--num-speculative-tokens", type=int, default=3,
                   help="largest number of draft tokens K to evaluate (default 3); positions beyond the head's "
                   "depth count reuse its layers cyclically, as the engines do")
    p.add_argument("--temperature", type=float, action="append",
                   help="sampling temperature (repeatable; default 1.0); greedy is always reported")
    p.add_argument("--max-samples", type=int, default=None, help="evaluate only the first N lines")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory for text lines (default: the checkpoint)")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--plot", default=None, metavar="PNG", help="also write a plot (needs matplotlib)")
    p.add_argument("--context-buckets", default=None, metavar="EDGES",
                   help="starts of the context-length buckets of the acceptance-by-context table, comma-separated "
                   "token counts from 0 ('k' = x1024; the last bucket is open-ended); default "
                   "0,256,512,1k,2k,...,128k")
    p.set_defaults(func=_accept_eval)


def build_parser() -> argparse.ArgumentParser:
    # Only cheap modules here (explain and demo import verl/torch inside their functions):
    # `--help`, `--version` and `ckpt` must not pay for verl/torch/ray. tests/test_cli_imports.py
    # checks it.
    from verl_mtp.tools.demo import DEFAULT_REGIMES, REGIMES
    from verl_mtp.tools.explain import WRAPPER_CONFIG_NAME

    parser = argparse.ArgumentParser(prog="verl-mtp", description="Multi-Token-Prediction for RL with verl.")
    parser.add_argument("--version", action=_VersionAction, help="print the versions of verl-mtp, verl, "
                        "megatron-core and torch, and exit")
    sub = parser.add_subparsers(dest="command", metavar="{explain,demo,ckpt,accept-eval}")
    parser.set_defaults(func=_usage_error(parser))
    explain = sub.add_parser(
        "explain",
        help="validate a run's MTP settings and print the resolved plan",
        description="Compose verl's Megatron PPO config with the given Hydra overrides (as passed to "
        "`python -m verl.trainer.main_ppo`), validate the MTP settings and print what the run will do.",
    )
    explain.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. actor_rollout_ref.model.mtp.enable=True")
    explain.add_argument(
        "--config-name",
        default=WRAPPER_CONFIG_NAME,
        help=f"primary config: {WRAPPER_CONFIG_NAME} (verl-mtp's wrapper, default) or one of verl's, "
        "e.g. ppo_megatron_trainer (then new keys need '+')",
    )
    explain.add_argument("--json", action="store_true", help="print the plan as JSON")
    explain.set_defaults(func=_explain)

    demo = sub.add_parser(
        "demo",
        help="run the MTP regimes side by side on a small CPU RL task",
        description="A tiny megatron-core GPT with an MTP head learns to continue digit patterns with "
        "GRPO (verl's advantages, verl's actor loss with verl-mtp's MTP term), once per MTP regime, "
        "from the same warmed-up weights and seeds. Writes metrics.jsonl, summary.json and demo.png.",
    )
    demo.add_argument("--steps", type=int, default=50, help="RL steps per regime (default 50)")
    demo.add_argument(
        "--regimes", default=",".join(DEFAULT_REGIMES),
        help=f"comma-separated, from {', '.join(REGIMES)} (none = a model without MTP head, for reference; "
        f"default {', '.join(DEFAULT_REGIMES)})",  # spaces: argparse wraps the line there, not inside a name
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="verl_mtp_demo", help="output directory (default ./verl_mtp_demo)")
    demo.add_argument("--warmup-steps", type=int, default=20, help="supervised warm-up steps (default 20)")
    demo.add_argument("--no-figure", action="store_true", help="skip the PNG (no matplotlib needed)")
    demo.set_defaults(func=_demo)
    _add_ckpt_parser(sub)
    _add_accept_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
