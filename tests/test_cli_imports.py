"""The `verl-mtp` console script starts fast: `--help`, `--version` and every `ckpt` subcommand
must not import verl (which loads torch, ray, transformers), megatron-core or even numpy.

What is measured is the set of modules the real console script imports (``python -X importtime``,
one line per module), not the time, so the guard holds on a busy machine.
"""

import os
import subprocess
import sys
from importlib.metadata import version

import pytest

from verl_mtp.testing.tiny_hf import write_tiny_checkpoint
from verl_mtp.version import __version__

VERL_MTP = os.path.join(os.path.dirname(sys.executable), "verl-mtp")
# Each costs from a tenth of a second (numpy, hydra) to ten seconds (verl: torch, ray, transformers).
HEAVY = {"verl", "torch", "ray", "megatron", "transformers", "tensordict", "numpy", "hydra", "omegaconf"}


def run(*args):
    """(returncode, stdout, stderr without import lines, top-level modules imported); ``run.imported``
    keeps the full module names of the last call."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", VERL_MTP, *map(str, args)], capture_output=True, text=True, timeout=300,
    )
    imported, err = set(), []
    for line in proc.stderr.splitlines():
        if line.startswith("import time:"):
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":  # the header line
                imported.add(name)
        else:
            err.append(line)
    run.imported = imported
    return proc.returncode, proc.stdout, "\n".join(err), {name.split(".")[0] for name in imported}


def assert_light(modules):
    assert "verl_mtp" in modules  # the parse saw the CLI's own imports
    assert not modules & HEAVY, sorted(modules & HEAVY)


def test_help_is_light():
    code, out, _, modules = run("--help")
    assert code == 0 and "ckpt" in out and "--version" in out
    assert_light(modules)


def test_version_names_the_installed_stack_without_importing_it():
    code, out, _, modules = run("--version")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"verl-mtp {__version__}"
    for dist in ("verl", "megatron-core", "torch"):
        assert f"  {dist} {version(dist)}" in lines
    assert_light(modules)


@pytest.mark.parametrize("args, names", [((), "explain, demo, ckpt, accept-eval"),
                                         (("ckpt",), "inspect, extract, stitch, graft")])
def test_command_group_without_command_prints_its_help_and_exits_2(args, names):
    code, out, err, modules = run(*args)
    assert code == 2 and not out
    assert "positional arguments" in err and f"a command is required: one of {names}" in err
    assert "ckpt_command" not in err  # argparse's own message named the dest
    assert_light(modules)


def test_ckpt_subcommands_are_light(tmp_path):
    base, verifier, rl = tmp_path / "base", tmp_path / "verifier", tmp_path / "rl"
    write_tiny_checkpoint(str(base), "mimo", mtp_depths=1, seed=1)
    write_tiny_checkpoint(str(verifier), "mimo", mtp_depths=1, seed=3)
    write_tiny_checkpoint(str(rl), "mimo", mtp_depths=0, seed=2)  # an RL export that dropped the head
    steps = [
        ("ckpt", "inspect", base),
        ("ckpt", "inspect", "--json", base),
        ("ckpt", "extract", base, tmp_path / "head"),
        ("ckpt", "stitch", verifier, tmp_path / "head", tmp_path / "stitched"),
        ("ckpt", "graft", base, rl, tmp_path / "grafted"),
        ("ckpt", "inspect", tmp_path / "grafted"),
        ("ckpt", "stitch", "--help"),
    ]
    for args in steps:
        code, out, err, modules = run(*args)
        assert code == 0, (args, out, err)
        assert_light(modules)
    assert os.path.isfile(tmp_path / "grafted" / "config.json")


def test_ckpt_error_path_is_light(tmp_path):
    code, _, err, modules = run("ckpt", "inspect", tmp_path)
    assert code == 2 and "config.json" in err
    assert_light(modules)


def test_demo_help_names_the_regimes_and_is_light():
    from verl_mtp.tools.demo import DEFAULT_REGIMES, REGIMES

    code, out, _, modules = run("demo", "--help")
    assert code == 0
    assert_light(modules)  # the regime names come from verl_mtp.tools.demo, which imports torch only to run
    flat = " ".join(out.split())
    assert f"from {', '.join(REGIMES)}" in flat and f"default {', '.join(DEFAULT_REGIMES)}" in flat


def test_explain_reads_the_mtp_api_without_importing_megatron_models():
    # explain needs verl (config classes, plugin) but from megatron-core only the name of its MTP
    # API: importing megatron.core.transformer for it would cost seconds.
    from verl_mtp.megatron.compat import PROCESS_MTP_LOSS_API, LEGACY_API
    from megatron.core.transformer import multi_token_prediction

    code, out, err, modules = run("explain", "actor_rollout_ref.model.mtp.mtp_training_mode=joint")
    assert code == 0, err
    assert "verl" in modules and not {m for m in run.imported if m.startswith("megatron.core.transformer")}
    api = PROCESS_MTP_LOSS_API if hasattr(multi_token_prediction, "process_mtp_loss") else LEGACY_API
    assert f"[megatron-core {version('megatron-core')} ({api} MTP API)]" in out
