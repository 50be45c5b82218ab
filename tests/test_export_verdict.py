"""An export-completeness failure on one rank fails the weight sync (and the HF save) on every rank.

Two trainer ranks (gloo, CPU) run verl 0.9.1's real Megatron engine with pipeline parallelism 2
(rank 0 the first stage, checked structurally; rank 1 the last stage, which holds the MTP block
and checks exact names), export through the patched ``get_per_tensor_param`` and consume the
stream as verl's bucketed weight sender does, then save ``model/huggingface`` through the engine's
checkpoint manager (``verl_mtp.testing.export_ranks``). The ranks run under a deadline: a rank
that waits forever is reported as hung and the test fails instead of hanging.
"""

from __future__ import annotations

import pytest

pytest.importorskip("mbridge")

from verl_mtp.testing.export_ranks import DROPPED, HUNG, run_ranks_with_deadline, weight_sync_rank  # noqa: E402

SCENARIOS = ["holds_mtp", "complete", "rank0_drops", "rank1_check_breaks", "complete_again", "hf_save_complete",
             "hf_save_file_lost"]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    from verl_mtp.testing.real_engine import write_tiny_engine_checkpoint

    path = write_tiny_engine_checkpoint(str(tmp_path_factory.mktemp("mimo")), mtp_depths=1, seed=3)
    saves = str(tmp_path_factory.mktemp("saves"))
    return run_ranks_with_deadline(weight_sync_rank, (path, saves), world_size=2, keys=SCENARIOS, deadline_s=420)


def test_no_rank_hangs(outcomes):
    hung = {key: [r for r, o in enumerate(ranks) if o == HUNG] for key, ranks in outcomes.items()}
    assert all(not ranks for ranks in hung.values()), f"ranks still waiting at the deadline: {hung}"


def test_a_complete_export_passes_on_every_rank(outcomes):
    assert outcomes["holds_mtp"] == [False, True]  # only the last stage holds the MTP block
    assert outcomes["complete"] == ["ok", "ok"]
    assert outcomes["complete_again"] == ["ok", "ok"]  # a failed sync leaves nothing behind


def test_a_tensor_missing_on_one_rank_fails_every_rank_with_its_name(outcomes):
    rank0, rank1 = outcomes["rank0_drops"]
    assert rank0 == rank1  # the same error everywhere
    assert rank0.startswith("IncompleteMtpExportError: incomplete MTP weight sync to the rollout engine on 1 of 2 rank(s)")
    assert "rank(s) 0: " in rank0 and "rank(s) 1" not in rank0
    assert DROPPED in rank0


def test_a_check_that_cannot_start_on_one_rank_fails_every_rank(outcomes):
    rank0, rank1 = outcomes["rank1_check_breaks"]
    assert rank0 == rank1
    assert "on 1 of 2 rank(s)" in rank0 and "rank(s) 1: " in rank0
    assert "check could not start: KeyError" in rank0 and "mtp.layers.0.eh_proj.weight" in rank0


def test_a_saved_hf_dir_that_rank_0_finds_incomplete_fails_every_rank(outcomes):
    assert outcomes["hf_save_complete"] == ["ok", "ok"]
    rank0, rank1 = outcomes["hf_save_file_lost"]
    assert rank0 == rank1
    assert rank0.startswith("IncompleteMtpExportError: incomplete MTP HF checkpoint ") and "on 1 of 2 rank(s)" in rank0
    assert "rank(s) 0: " in rank0 and DROPPED in rank0
