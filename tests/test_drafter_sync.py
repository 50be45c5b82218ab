"""The MTP drafter is provably in sync after every weight sync (verl_mtp.rollout.drafter_sync).

Fingerprints are tested on real tensors (bf16 and fp32); the engine-side recorder runs in a
separate Python process fed real tensors exported from a real tiny megatron-core MiMo model
(through verl-mtp's mbridge bridge), and the verdict is taken by the same checker verl's vLLM
adapter uses. No GPU inference engine exists here: the engine worker and its drafter model in
that process are stand-ins (a fake of vLLM's worker, mirroring verl 0.9.1's
vLLMColocateWorkerExtension attributes), each marked as such below.
"""

import ast
import json
import os
import subprocess
import sys
import types

import pytest
import torch

import verl_mtp.rollout.drafter_sync as ds
from verl_mtp.config import ExtendedMtpConfig, MtpConfigError
from verl_mtp.rollout.drafter_sync import (
    METRIC_CHECKED_FRACTION,
    METRIC_IN_SYNC,
    METRIC_WORKERS_CHECKED,
    METRIC_WORKERS_EXPECTED,
    DrafterOutOfSyncError,
    DrafterSyncChecker,
    DrafterSyncRecorder,
    DrafterSyncWarning,
    compare_drafter_sync,
    fingerprint_pieces,
    fingerprint_tensor,
    mtp_tensor_classifier,
)
from verl_mtp.run_checks import validate_mtp_run_config
from verl_mtp.testing.tiny_hf import tiny_config

DTYPES = [torch.bfloat16, torch.float32]


def _counts(checked, expected):
    return {METRIC_WORKERS_CHECKED: float(checked), METRIC_WORKERS_EXPECTED: float(expected),
            METRIC_CHECKED_FRACTION: checked / expected}


# the metrics of a verified sync of a one-worker replica
IN_SYNC = {METRIC_IN_SYNC: 1.0, **_counts(1, 1)}


def _nudge(tensor: torch.Tensor, index: tuple) -> torch.Tensor:
    """A copy with one element moved to the next representable value (the smallest possible change)."""
    as_int = {torch.bfloat16: torch.int16, torch.float32: torch.int32}[tensor.dtype]
    out = tensor.clone()
    out.view(as_int)[index] += 1
    assert not torch.equal(out, tensor) and torch.isfinite(out).all()
    return out


# --- fingerprints ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_identical_weights_match_and_the_smallest_change_of_one_element_does_not(dtype):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 33, generator=g).to(dtype)
    same_values_other_memory = weight.t().contiguous().t()  # same values, different strides
    assert fingerprint_tensor(weight) == fingerprint_tensor(same_values_other_memory)
    for index in [(0, 0), (17, 5), (47, 32)]:
        assert fingerprint_tensor(_nudge(weight, index)) != fingerprint_tensor(weight), index


@pytest.mark.parametrize("dtype", DTYPES)
def test_swapped_elements_and_dtype_changes_are_detected(dtype):
    weight = torch.randn(64, generator=torch.Generator().manual_seed(1)).to(dtype)
    swapped = weight.clone()
    swapped[[3, 40]] = weight[[40, 3]]
    assert fingerprint_tensor(swapped).word_sum == fingerprint_tensor(weight).word_sum  # same multiset
    assert fingerprint_tensor(swapped) != fingerprint_tensor(weight)
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    diff = fingerprint_tensor(weight).difference(fingerprint_tensor(weight.to(other)))
    assert diff.startswith("dtype")


@pytest.mark.parametrize("dtype", DTYPES + [torch.uint8])
def test_a_tensor_split_into_contiguous_pieces_has_the_fingerprint_of_the_whole(dtype, monkeypatch):
    cols = 8 if dtype == torch.uint8 else 7  # 1-byte elements: pieces must start on a 16-bit word
    whole = (torch.randn(10, cols, generator=torch.Generator().manual_seed(2)) * 50).to(dtype)
    expected = fingerprint_tensor(whole)
    rows = [(0, whole[:3]), (3 * cols, whole[3:4]), (4 * cols, whole[4:])]  # row blocks, any order
    assert fingerprint_pieces(reversed(rows), dtype=dtype, shape=whole.shape) == expected
    flat = whole.reshape(-1)
    chunks = [(0, flat[:20]), (20, flat[20:52]), (52, flat[52:])]  # flat chunks (checkpoint engines)
    assert fingerprint_pieces(chunks, dtype=dtype, shape=whole.shape) == expected
    # a piece in the wrong place is a different tensor
    assert fingerprint_pieces([(0, whole[4:]), (6 * cols, whole[:4])], dtype=dtype, shape=whole.shape) != expected
    if dtype == torch.uint8:
        with pytest.raises(ValueError, match="16-bit words|2-byte word"):
            fingerprint_pieces([(0, flat[:21]), (21, flat[21:])], dtype=dtype, shape=whole.shape)
    # the reduction is chunked on the device; the chunk size must not matter
    monkeypatch.setattr(ds.fingerprint, "_CHUNK_WORDS", 5)
    assert fingerprint_tensor(whole) == expected


# --- verdicts from in-process recorders (the same code the engine worker runs) ---------------------


MIMO = tiny_config("mimo", 1)


def _mtp_stream(seed: int, dtype=torch.bfloat16) -> list[tuple[str, torch.Tensor]]:
    from verl_mtp.testing.tiny_hf import random_tensors

    return [(n, t.to(dtype)) for n, t in random_tensors(MIMO, seed).items()]


class _Drafter(torch.nn.Module):
    """Stand-in for the engine's drafter model: stores the MTP tensors it is given."""

    def __init__(self, names_shapes, drop=()):
        super().__init__()
        self.slots = {}
        self.drop = set(drop)
        for i, (name, shape, dtype) in enumerate(names_shapes):
            self.register_parameter(f"p{i}", torch.nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False))
            self.slots[name] = f"p{i}"

    def load_weights(self, weights):
        loaded = set()
        for name, tensor in weights:
            if name in self.slots and name not in self.drop:
                getattr(self, self.slots[name]).data.copy_(tensor)
                loaded.add(name)
        return loaded


def _sync(checker, stream, recorder, drafter, *, drafter_loads=True, lose=()):
    """One sync: the checker wraps the trainer stream; the 'engine' loads it into the drafter."""
    recorder.begin_sync(drafter)
    sent = list(checker.begin(iter(stream)))
    if drafter_loads:
        drafter.load_weights([(n, t) for n, t in sent if n not in lose])
    recorder.end_sync()
    return checker.finish([recorder.report()])


def _setup(mode="raise", drop=()):
    is_mtp = mtp_tensor_classifier(MIMO)
    stream = _mtp_stream(0)
    mtp = [(n, tuple(t.shape), t.dtype) for n, t in stream if is_mtp(n)]
    drafter = _Drafter(mtp, drop=drop)
    return is_mtp, DrafterSyncChecker(is_mtp, mode, 1), DrafterSyncRecorder(is_mtp, worker="w0", speculative_method="mtp"), drafter


def test_in_sync_drafter_passes_and_reports_the_metric():
    is_mtp, checker, recorder, drafter = _setup()
    assert _sync(checker, _mtp_stream(0), recorder, drafter) == IN_SYNC
    assert _sync(checker, _mtp_stream(1), recorder, drafter) == IN_SYNC
    assert recorder.load_calls == 1 and len(recorder.received) == len(drafter.slots) > 4


@pytest.mark.parametrize("mode", ["raise", "auto"])
def test_a_stale_copy_is_detected_after_a_second_sync_with_changed_weights(mode):
    is_mtp, checker, recorder, drafter = _setup(mode)
    _sync(checker, _mtp_stream(0), recorder, drafter)
    with pytest.raises(DrafterOutOfSyncError, match=r"stale copy: the drafter's load_weights was not called") as err:
        _sync(checker, _mtp_stream(1), recorder, drafter, drafter_loads=False)
    assert "model.mtp_layers.0.input_proj.weight" in str(err.value)


def test_a_missing_tensor_is_named():
    is_mtp, checker, recorder, drafter = _setup()
    lost = "model.mtp_layers.0.token_layernorm.weight"
    with pytest.raises(DrafterOutOfSyncError, match=rf"missing on the drafter \(sent, never received\): {lost}"):
        _sync(checker, _mtp_stream(0), recorder, drafter, lose={lost})


def test_one_changed_element_is_named():
    is_mtp, checker, recorder, drafter = _setup()
    name = "model.mtp_layers.0.input_proj.weight"
    # corrupt what the drafter receives, after the trainer's fingerprint was taken
    recorder.begin_sync(drafter)
    sent = list(checker.begin(iter(_mtp_stream(0))))
    drafter.load_weights((n, _nudge(t, (1, 2)) if n == name else t) for n, t in sent)  # a generator this time
    recorder.end_sync()
    with pytest.raises(DrafterOutOfSyncError, match=rf"mismatch in {name}: trainer vs drafter values differ"):
        checker.finish([recorder.report()])


def test_a_drafter_that_drops_what_it_receives_is_detected_on_the_next_change():
    is_mtp, checker, recorder, drafter = _setup(drop={n for n, _ in _mtp_stream(0)})
    _sync(checker, _mtp_stream(0), recorder, drafter)  # first sync: nothing to compare against yet
    with pytest.raises(DrafterOutOfSyncError, match=r"parameters did not change \(load_weights dropped them\)"):
        _sync(checker, _mtp_stream(1), recorder, drafter)


def test_a_quantising_engine_is_checked_for_arrival_not_values():
    """fp8 rollout: the engine quantises before the drafter's load_weights (and adds scales)."""
    is_mtp, checker, recorder, drafter = _setup()
    recorder.quantization = "fp8"

    def quantised(sent, lose=()):
        for n, t in sent:
            if n in lose:
                continue
            if t.dim() == 2:
                yield n, t.to(torch.float8_e4m3fn)
                yield n.replace(".weight", ".weight_scale_inv"), torch.ones(1)
            else:
                yield n, t

    drafter.load_weights = lambda weights: [None for _ in weights]  # the fake drafter cannot hold fp8
    recorder.begin_sync(drafter)
    drafter.load_weights(list(quantised(checker.begin(iter(_mtp_stream(0))))))
    recorder.end_sync()
    assert checker.finish([recorder.report()]) == IN_SYNC
    lost = "model.mtp_layers.0.input_proj.weight"
    recorder.begin_sync(drafter)
    drafter.load_weights(list(quantised(checker.begin(iter(_mtp_stream(1))), lose={lost})))
    recorder.end_sync()
    with pytest.raises(DrafterOutOfSyncError, match=f"missing on the drafter .*{lost}"):
        checker.finish([recorder.report()])


def test_changed_trunk_copies_alone_do_not_require_the_drafter_to_change():
    """DeepSeek-V3 exports the embedding / lm_head again under each MTP depth; with a frozen MTP
    head only those copies change, and engines tie them to the target's tensors."""
    config = tiny_config("deepseek_v3", 1)
    is_mtp = mtp_tensor_classifier(config)
    copies = ["model.layers.2.embed_tokens.weight", "model.layers.2.shared_head.head.weight"]
    own = "model.layers.2.enorm.weight"
    assert all(is_mtp(n) for n in copies + [own]) and not is_mtp("model.embed_tokens.weight")
    before = {n: fingerprint_tensor(torch.zeros(3)) for n in copies + [own]}
    after = dict(before, **{n: fingerprint_tensor(torch.ones(3)) for n in copies})
    report = {"worker": "w", "speculative_method": "mtp", "drafter_present": True, "sync_index": 2, "load_calls": 1,
              "received": {n: fp.to_wire() for n, fp in after.items()}, "digest_before": (1, 2), "digest_after": (1, 2)}
    assert compare_drafter_sync(after, [report], sync_index=2, previous_trainer=before, expected_workers=1).in_sync
    moved = dict(after, **{own: fingerprint_tensor(torch.ones(3))})
    report["received"] = {n: fp.to_wire() for n, fp in moved.items()}
    verdict = compare_drafter_sync(moved, [report], sync_index=2, previous_trainer=before)
    assert "1 changed MTP tensor(s) but its parameters did not change" in verdict.message() and own in verdict.message()


def test_a_worker_that_did_not_record_this_sync_is_stale():
    """The engine ran no weight load at all (its counter did not move): the old report must not pass."""
    is_mtp, checker, recorder, drafter = _setup()
    _sync(checker, _mtp_stream(0), recorder, drafter)
    list(checker.begin(iter(_mtp_stream(1))))  # sent, but the worker never started a sync
    with pytest.raises(DrafterOutOfSyncError, match=r"did not run a weight load for this sync \(its sync counter is still 1\)"):
        checker.finish([recorder.report()])


def test_async_streams_are_fingerprinted_and_passed_through_unchanged():
    """Checkpoint-engine backends hand the adapter an async iterator of received tensors."""
    import asyncio

    from verl_mtp.rollout.drafter_sync import StreamFingerprints

    stream = _mtp_stream(4)

    async def received():
        for pair in stream:
            yield pair

    async def consume(wrapped):
        return [pair async for pair in wrapped]

    prints = StreamFingerprints(mtp_tensor_classifier(MIMO))
    out = asyncio.run(consume(prints.wrap(received())))
    assert [n for n, _ in out] == [n for n, _ in stream] and all(a is b for (_, a), (_, b) in zip(out, stream))
    mtp = {n: fingerprint_tensor(t) for n, t in stream if n.startswith("model.mtp_layers.")}
    assert prints.fingerprints == mtp and prints.total_tensors == len(stream)


def test_no_mtp_tensor_in_the_stream_fails():
    is_mtp, checker, recorder, drafter = _setup()
    trunk_only = [(n, t) for n, t in _mtp_stream(0) if not is_mtp(n)]
    with pytest.raises(DrafterOutOfSyncError, match="carried no MTP tensor"):
        _sync(checker, trunk_only, recorder, drafter)


def test_warn_mode_warns_records_zero_and_turns_speculation_off_for_the_next_step(capsys):
    from verl_mtp.rollout import spec_control

    controller = spec_control._CONTROLLER
    saved = (controller.forced_off_steps, controller.forced_reason)
    try:
        controller.forced_off_steps = 0
        is_mtp, checker, recorder, drafter = _setup(mode="warn")
        _sync(checker, _mtp_stream(0), recorder, drafter)
        with pytest.warns(DrafterSyncWarning, match="stale copy"):
            metrics = _sync(checker, _mtp_stream(1), recorder, drafter, drafter_loads=False)
        assert metrics == {METRIC_IN_SYNC: 0.0, **_counts(1, 1)} == ds.latest_drafter_sync_metrics()
        assert controller.forced_off_steps == 1 and "weight sync #2" in controller.forced_reason
        # No engine here has a runtime switch: the message must not claim speculation is off.
        assert controller.actuator is None
        assert "the engine has no runtime switch" in capsys.readouterr().err
        controller.forced_off_steps = 0
        controller.actuator = lambda enabled: True  # an engine that can switch (none exists yet)
        with pytest.warns(DrafterSyncWarning, match="stale copy"):
            _sync(checker, _mtp_stream(2), recorder, drafter, drafter_loads=False)
        assert "speculation is turned OFF for the next step" in capsys.readouterr().err
    finally:
        controller.forced_off_steps, controller.forced_reason = saved
        controller.actuator = None


def test_off_mode_checks_nothing():
    is_mtp, checker, recorder, drafter = _setup(mode="off")
    assert _sync(checker, _mtp_stream(0), recorder, drafter, drafter_loads=False) == {}


def test_a_worker_without_drafter_is_fine_only_when_speculation_is_off():
    trainer = {"model.mtp_layers.0.input_proj.weight": fingerprint_tensor(torch.ones(2))}
    off = {"worker": "w", "speculative_method": None, "drafter_present": False, "sync_index": 1}
    assert compare_drafter_sync(trainer, [off], sync_index=1, expected_workers=1).in_sync
    lost = dict(off, speculative_method="mtp")
    verdict = compare_drafter_sync(trainer, [lost], sync_index=1)
    assert not verdict.in_sync and "has no drafter model" in verdict.message()
    assert "no engine worker reported" in compare_drafter_sync(trainer, [], sync_index=1).message()


# --- the engine worker in its own process ---------------------------------------------------------

WORKER_SCRIPT = r'''
"""FAKE of a GPU inference engine's worker (vLLM cannot run here): the class below has the
attributes verl 0.9.1's vLLMColocateWorkerExtension uses (model_runner.model / .drafter.model /
.vllm_config.speculative_config.method) and loads weights the way verl's _update_weights does:
every model of _iter_all_models() gets each bucket, and the drafter is included only when the
speculative method is exactly "mtp" (verl 0.9.1's condition). verl-mtp's real worker patch is
applied to it. The drafter fuses q/k/v into one parameter, as vLLM's drafters do."""
import json, sys, types
import torch
import verl  # noqa: F401  (activates the verl-mtp plugin, as in every verl process)
from verl_mtp.patches import rollout as patches
from verl_mtp.rollout import drafter_sync as ds
from verl_mtp.testing.tiny_hf import hf_tensor_shapes

config = json.loads(sys.argv[1])
is_mtp = ds.mtp_tensor_classifier(config)
shapes = {n: s for n, s in hf_tensor_shapes(config).items()}


class Target(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Parameter(torch.zeros(shapes["model.embed_tokens.weight"]), requires_grad=False)

    def load_weights(self, weights):
        for name, tensor in weights:
            if name == "model.embed_tokens.weight":
                self.embed.data.copy_(tensor)


class FusingDrafter(torch.nn.Module):
    def __init__(self, target, drop_all=False):
        super().__init__()
        self.embed = target.embed  # shared with the target, as engines do
        self.drop_all = drop_all
        self.params = torch.nn.ParameterDict()
        self.where = {}
        qkv = {}
        for name, shape in shapes.items():
            if not is_mtp(name):
                continue
            for proj in ("q_proj", "k_proj", "v_proj"):
                if f".self_attn.{proj}." in name:
                    fused = name.replace(proj, "qkv_proj")
                    start = qkv.setdefault(fused, [0])
                    self.where[name] = (fused.replace(".", "_"), start[0], shape[0])
                    start[0] += shape[0]
                    break
            else:
                self.where[name] = (name.replace(".", "_"), None, None)
                self.params[name.replace(".", "_")] = torch.nn.Parameter(torch.zeros(shape), requires_grad=False)
        for fused, (rows,) in qkv.items():
            cols = shapes[fused.replace("qkv_proj", "q_proj")][1:]
            self.params[fused.replace(".", "_")] = torch.nn.Parameter(torch.zeros(rows, *cols), requires_grad=False)

    def load_weights(self, weights):
        loaded = set()
        for name, tensor in weights:
            if name not in self.where or self.drop_all:
                continue
            key, start, rows = self.where[name]
            dest = self.params[key].data
            (dest if start is None else dest[start:start + rows]).copy_(tensor)
            loaded.add(key)
        return loaded


class vLLMColocateWorkerExtension:
    def __init__(self, method, drop_all):
        target = Target()
        self.rank = 0
        self.model_runner = types.SimpleNamespace(
            model=target,
            drafter=types.SimpleNamespace(model=FusingDrafter(target, drop_all)),
            vllm_config=types.SimpleNamespace(
                speculative_config=types.SimpleNamespace(method=method),
                model_config=types.SimpleNamespace(hf_config=config),
            ),
        )

    def _get_drafter_model(self):
        return self.model_runner.drafter.model

    def _iter_all_models(self):
        yield self.model_runner.model
        if self.model_runner.vllm_config.speculative_config.method == "mtp":
            yield self._get_drafter_model()

    def update_weights_from_ipc(self, buckets):
        for bucket in buckets:
            for model in self._iter_all_models():
                model.load_weights(bucket)


module = types.ModuleType("fake_vllm_worker_module")
module.vLLMColocateWorkerExtension = vLLMColocateWorkerExtension
restore = []
patches.patch_vllm_worker_extension(module, restore)
worker = None
for line in sys.stdin:
    request = json.loads(line)
    if worker is None:
        worker = vLLMColocateWorkerExtension(request["method"], request.get("drop_all", False))
    worker.model_runner.vllm_config.speculative_config.method = request["method"]
    received = list(torch.load(request["file"]).items())  # what arrived over the wire
    received = [(n, t) for n, t in received if n not in set(request.get("lose", []))]
    if request.get("corrupt"):
        name, index = request["corrupt"], request["index"]
        received = [(n, t.clone().index_put_((torch.tensor(index),), t.reshape(-1)[index] + 1e-2) if n == name else t)
                    for n, t in received]
    buckets = [received[i:i + 5] for i in range(0, len(received), 5)]
    worker.update_weights_from_ipc(buckets)
    report = getattr(worker, ds.VLLM_REPORT_METHOD)()  # what collective_rpc(name) runs in each worker
    print(json.dumps(report), flush=True)
'''


@pytest.fixture(scope="module")
def tiny_mimo_model(tmp_path_factory):
    """A real megatron-core model with an MTP depth, loaded from a tiny MiMo checkpoint through
    verl-mtp's mbridge bridge (the exporter verl's Megatron engine uses for weight sync)."""
    from verl_mtp.local_megatron.hf_model import load_hf_model
    from verl_mtp.testing.tiny_hf import write_tiny_checkpoint

    path = str(tmp_path_factory.mktemp("mimo"))
    write_tiny_checkpoint(path, "mimo", mtp_depths=1, seed=3)
    return load_hf_model(path)


def _export_stream(loaded, dtype):
    """The (name, tensor) stream verl's vanilla-mbridge engine sends (get_per_tensor_param)."""
    from verl_mtp.local_megatron.single_process import cpu_megatron

    with cpu_megatron():
        for name, tensor in loaded.bridge.export_weights([loaded.model]):
            yield name, tensor.detach().to(dtype)


def _train_mtp_a_little(loaded, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in loaded.model.named_parameters():
            if name.startswith("mtp."):
                param.add_(0.05 * torch.randn(param.shape, generator=g))


class _EngineWorker:
    def __init__(self, config):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER_SCRIPT, json.dumps(config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )

    def sync(self, file, **request):
        self.proc.stdin.write(json.dumps(dict(request, file=str(file))) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"engine worker died: {self.proc.stderr.read()[-3000:]}")
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _send(checker, loaded, dtype, path):
    """Trainer side: the checker fingerprints the export stream while it is 'sent' (to a file)."""
    sent = {}
    for name, tensor in checker.begin(_export_stream(loaded, dtype)):
        sent[name] = tensor
    torch.save(sent, path)
    return sent


@pytest.mark.parametrize("dtype", DTYPES)
def test_engine_worker_process_verdicts_on_a_real_megatron_export(tiny_mimo_model, tmp_path, dtype):
    """Trainer-side fingerprints of a real megatron-core export vs a recorder running in another
    process behind a FAKE engine worker (see WORKER_SCRIPT): in sync, then each failure."""
    loaded = tiny_mimo_model
    config = loaded.hf_config
    is_mtp = mtp_tensor_classifier(config)
    worker = _EngineWorker(config)
    try:
        checker = DrafterSyncChecker(is_mtp, "raise", 1)
        sent = _send(checker, loaded, dtype, tmp_path / "s1.pt")
        mtp_names = sorted(n for n in sent if is_mtp(n))
        assert len(mtp_names) >= 8 and any(".self_attn.q_proj." in n for n in mtp_names)
        report = worker.sync(tmp_path / "s1.pt", method="mtp")
        buckets = -(-len(sent) // 5)  # the fake worker loads 5 tensors per bucket
        assert report["load_calls"] == buckets > 1 and sorted(report["received"]) == mtp_names
        assert checker.finish([report]) == IN_SYNC

        # after a training step, the drafter gets the new weights: still in sync
        _train_mtp_a_little(loaded, 1)
        _send(checker, loaded, dtype, tmp_path / "s2.pt")
        assert checker.finish([worker.sync(tmp_path / "s2.pt", method="mtp")]) == IN_SYNC

        # stale copy: verl 0.9.1 syncs the drafter only for method == "mtp"; "deepseek_mtp" skips it
        _train_mtp_a_little(loaded, 2)
        _send(checker, loaded, dtype, tmp_path / "s3.pt")
        with pytest.raises(DrafterOutOfSyncError, match="stale copy") as err:
            checker.finish([worker.sync(tmp_path / "s3.pt", method="deepseek_mtp")])
        assert all(n in str(err.value) for n in mtp_names[:3])

        # a missing tensor (the sync path skipped it for the drafter)
        lost = next(n for n in mtp_names if "input_proj" in n)
        _send(checker, loaded, dtype, tmp_path / "s4.pt")
        with pytest.raises(DrafterOutOfSyncError, match=rf"missing on the drafter \(sent, never received\): {lost}"):
            checker.finish([worker.sync(tmp_path / "s4.pt", method="mtp", lose=[lost])])

        # one element changed on the way
        bad = next(n for n in mtp_names if ".self_attn.k_proj." in n)
        _send(checker, loaded, dtype, tmp_path / "s5.pt")
        with pytest.raises(DrafterOutOfSyncError, match=rf"mismatch in {bad}: trainer vs drafter values differ"):
            checker.finish([worker.sync(tmp_path / "s5.pt", method="mtp", corrupt=bad, index=7)])
    finally:
        worker.close()


def test_engine_worker_process_detects_a_drafter_that_drops_its_weights(tiny_mimo_model, tmp_path):
    loaded = tiny_mimo_model
    is_mtp = mtp_tensor_classifier(loaded.hf_config)
    worker = _EngineWorker(loaded.hf_config)
    try:
        checker = DrafterSyncChecker(is_mtp, "raise", 1)
        _send(checker, loaded, torch.bfloat16, tmp_path / "s1.pt")
        assert checker.finish([worker.sync(tmp_path / "s1.pt", method="mtp", drop_all=True)]) == IN_SYNC
        _train_mtp_a_little(loaded, 5)
        _send(checker, loaded, torch.bfloat16, tmp_path / "s2.pt")
        with pytest.raises(DrafterOutOfSyncError, match=r"parameters did not change \(load_weights dropped them\)"):
            checker.finish([worker.sync(tmp_path / "s2.pt", method="mtp", drop_all=True)])
    finally:
        worker.close()


# --- config ---------------------------------------------------------------------------------------


def test_drafter_sync_check_validation():
    assert ExtendedMtpConfig().drafter_sync_check == "auto"
    for mode in ("auto", "raise", "warn", "off"):
        assert ExtendedMtpConfig(drafter_sync_check=mode).drafter_sync_check == mode
    with pytest.raises(MtpConfigError, match=r"mtp\.drafter_sync_check='loud' is invalid: valid choices are auto, raise, warn, off"):
        ExtendedMtpConfig(drafter_sync_check="loud")


def _run_config(engine, check, backend="naive", model_path="/nonexistent", data_parallel=1):
    return {
        "actor_rollout_ref": {
            "actor": {"strategy": "megatron"},
            "model": {"path": model_path, "mtp": {"enable": True, "enable_rollout": True, "drafter_sync_check": check}},
            "rollout": {"name": engine, "checkpoint_engine": {"backend": backend}, "data_parallel_size": data_parallel},
        }
    }


def test_run_config_refuses_a_check_it_cannot_do_unless_warned():
    validate_mtp_run_config(_run_config("vllm", "raise"))
    with pytest.raises(MtpConfigError, match=r"drafter_sync_check='raise' is invalid here: .*vLLM only.*'sglang'"):
        validate_mtp_run_config(_run_config("sglang", "raise"))
    with pytest.raises(MtpConfigError, match=r"delta_sharded"):
        validate_mtp_run_config(_run_config("vllm", "raise", backend="delta_sharded"))
    with pytest.warns(DrafterSyncWarning, match="will NOT be verified"):
        validate_mtp_run_config(_run_config("sglang", "warn"))
    # auto (the default): checked where it can be, a loud warning where it cannot, never an error.
    validate_mtp_run_config(_run_config("vllm", "auto"))
    with pytest.warns(DrafterSyncWarning, match="will NOT be verified"):
        validate_mtp_run_config(_run_config("sglang", "auto"))
    validate_mtp_run_config(_run_config("sglang", "off"))


def test_yaml_declares_the_key_with_the_dataclass_default():
    import yaml

    import verl_mtp.conf

    with open(os.path.join(os.path.dirname(verl_mtp.conf.__file__), "ppo_megatron_mtp.yaml")) as f:
        mtp = yaml.safe_load(f)["actor_rollout_ref"]["model"]["mtp"]
    assert mtp["drafter_sync_check"] == ExtendedMtpConfig().drafter_sync_check


def test_unknown_family_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model family"):
        mtp_tensor_classifier({"model_type": "llama", "num_nextn_predict_layers": 1})
    with pytest.raises(ValueError, match="declares no MTP depth"):
        mtp_tensor_classifier(tiny_config("mimo", 0))


# --- the patches' targets in the installed verl (vLLM is not installed: read, not imported) ------

VLLM_ROLLOUT = os.path.join(os.path.dirname(__import__("verl").__file__), "workers", "rollout", "vllm_rollout")


def _function(path, cls, name):
    source = open(path).read()
    tree = ast.parse(source)
    klass = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    fn = next(n for n in klass.body if getattr(n, "name", None) == name)
    return source, fn


def test_patch_targets_match_installed_verl():
    from verl_mtp.rollout.weight_sync import collective_rpc_body_kind as _collective_rpc_body_kind_of_source

    source, fn = _function(os.path.join(VLLM_ROLLOUT, "vllm_async_server.py"), "vLLMHttpServer", "collective_rpc")
    assert [a.arg for a in fn.args.args] == ["self", "method", "timeout", "args", "kwargs"]
    segment = ast.get_source_segment(source, fn)
    # verl 0.9.1 drops the workers' results (the patch makes it return them); a verl that already
    # returns them is left alone; any other body is refused
    assert _collective_rpc_body_kind_of_source(segment) == "discards"
    assert _collective_rpc_body_kind_of_source(segment.replace("await self.engine", "return await self.engine")) == "returns"
    assert _collective_rpc_body_kind_of_source(segment.replace("await self.engine.collective_rpc(", "x = 1\n        await self.engine.collective_rpc(")) == "unknown"

    _, update = _function(os.path.join(VLLM_ROLLOUT, "vllm_rollout.py"), "ServerAdapter", "update_weights")
    assert [a.arg for a in update.args.args][:4] == ["self", "weights", "global_steps", "wire_format"]
    _, execute = _function(os.path.join(VLLM_ROLLOUT, "vllm_rollout.py"), "ServerAdapter", "_execute_method")
    assert isinstance(execute, ast.AsyncFunctionDef) and "collective_rpc" in ast.unparse(execute)
    _function(os.path.join(VLLM_ROLLOUT, "utils.py"), "vLLMColocateWorkerExtension", "update_weights_from_ipc")
    _, drafter = _function(os.path.join(VLLM_ROLLOUT, "utils.py"), "vLLMColocateWorkerExtension", "_get_drafter_model")
    drafter_src = ast.unparse(drafter)
    assert "self.model_runner" in drafter_src and "'drafter'" in drafter_src  # where the recorder finds it


def test_patched_adapter_checks_after_the_sync_and_returns_the_metric(tmp_path):
    """The real patch on a FAKE of verl's vLLM ServerAdapter (vllm cannot be imported here): the
    adapter streams to a recorder in this process standing in for the engine worker."""
    import asyncio
    import types

    from verl_mtp.patches import rollout as patches

    is_mtp = mtp_tensor_classifier(MIMO)
    recorder = DrafterSyncRecorder(is_mtp, worker="w0", speculative_method="mtp")
    stream = _mtp_stream(0)
    drafter = _Drafter([(n, tuple(t.shape), t.dtype) for n, t in stream if is_mtp(n)])

    class ServerAdapter:  # FAKE: the signature and helpers of verl 0.9.1's vLLM ServerAdapter
        def __init__(self, mtp):
            self._has_server = True
            self.model_config = types.SimpleNamespace(mtp=mtp, hf_config=MIMO)
            self.config = types.SimpleNamespace(  # verl's RolloutConfig: one worker serves this replica
                tensor_model_parallel_size=1, pipeline_model_parallel_size=1, data_parallel_size=1)

        async def update_weights(self, weights, global_steps=None, wire_format="named_tensors", **kwargs):
            recorder.begin_sync(drafter)
            sent = list(weights)  # the stream is consumed (and fingerprinted) by the transfer
            if self.load_drafter:
                drafter.load_weights(sent)
            recorder.end_sync()

        async def _execute_method(self, method, non_block=False, timeout=None, args=(), kwargs=None):
            assert method == ds.VLLM_REPORT_METHOD  # collective_rpc by name on every worker
            return [ds.vllm_worker_drafter_report(types.SimpleNamespace(_verl_mtp_drafter_recorder=recorder))]

    module = types.ModuleType("fake_vllm_rollout")
    module.ServerAdapter = ServerAdapter
    restore = []
    patches.patch_vllm_server_adapter(module, restore)
    mtp = ExtendedMtpConfig(enable=True, enable_rollout=True)
    adapter = ServerAdapter(mtp)
    adapter.load_drafter = True
    assert asyncio.run(adapter.update_weights(iter(stream), global_steps=1)) == IN_SYNC
    adapter.load_drafter = False  # a sync that updates only the target
    with pytest.raises(DrafterOutOfSyncError, match="stale copy"):
        asyncio.run(adapter.update_weights(iter(_mtp_stream(1)), global_steps=2))
    # check off: the stream passes through untouched, no report is asked for
    quiet = ServerAdapter(ExtendedMtpConfig(enable=True, enable_rollout=True, drafter_sync_check="off"))
    quiet.load_drafter = False
    assert asyncio.run(quiet.update_weights(iter(_mtp_stream(2)), global_steps=3)) is None
    for owner, attr, original in reversed(restore):
        setattr(owner, attr, original)
    assert ServerAdapter.update_weights.__name__ == "update_weights"
    assert not hasattr(ServerAdapter.update_weights, "__verl_mtp_original__")


def test_worker_patch_applies_and_undoes_through_a_deferred_patch():
    """verl-mtp's real deferred patch on a FAKE module holding a class shaped like verl 0.9.1's
    vLLMColocateWorkerExtension (verl's module imports vllm, absent here)."""
    import types

    from verl_mtp.patches import core as patches_core, rollout as patches

    class vLLMColocateWorkerExtension:
        def update_weights_from_ipc(self, peft_config=None, base_sync_done=False, use_shm=False):
            return "synced"

        def _get_drafter_model(self):
            return None

    original = vLLMColocateWorkerExtension.update_weights_from_ipc
    module = types.ModuleType("verl_mtp_test_fake_vllm_utils")
    module.vLLMColocateWorkerExtension = vLLMColocateWorkerExtension
    sys.modules[module.__name__] = module
    patch = patches_core.deferred_patch("t", "test", {module.__name__: patches.patch_vllm_worker_extension})
    try:
        patch.apply()
        worker = vLLMColocateWorkerExtension()
        worker.model_runner = types.SimpleNamespace(
            model=torch.nn.Linear(2, 2),
            vllm_config=types.SimpleNamespace(speculative_config=None, model_config=types.SimpleNamespace(hf_config=MIMO)),
        )
        assert worker.update_weights_from_ipc() == "synced"
        report = getattr(worker, ds.VLLM_REPORT_METHOD)()
        assert (report["sync_index"], report["drafter_present"], report["speculative_method"], report["error"]) == (
            1, False, None, None)
    finally:
        patch.undo()
        del sys.modules[module.__name__]
    assert vLLMColocateWorkerExtension.update_weights_from_ipc is original
    assert not hasattr(vLLMColocateWorkerExtension, ds.VLLM_REPORT_METHOD)


# --- the verdict reaches the driver's step metrics (colocated sync) --------------------------------


def test_the_verdict_travels_from_the_trainer_worker_to_the_driver_step_metrics(monkeypatch):
    """verl 0.9.1 drops what ``ActorRolloutRefWorker.update_weights`` returns in the colocated
    (naive) sync. The patched worker returns the replica leader's verdict once, the patched
    ``CheckpointEngineManager.update_weights`` keeps the workers' results, and verl's
    ``compute_throughout_metrics`` (patched) logs them. Ray is not started: ``ray.get`` stands in
    as the identity and the worker group returns the workers' results directly."""
    import asyncio

    import ray

    import verl.checkpoint_engine.base as ckpt_base
    import verl.trainer.ppo.ray_trainer as ray_trainer
    import verl.workers.engine_workers as engine_workers
    from verl import DataProto
    from verl.single_controller.base.decorator import MAGIC_ATTR

    from verl_mtp.patches.rollout import worker_update_weights_returning_drafter_metrics as _worker_update_weights_returning_drafter_metrics

    # The real worker method is wrapped and keeps verl's dispatch attributes (ONE_TO_ALL, non-blocking).
    patched = engine_workers.ActorRolloutRefWorker.update_weights
    assert getattr(patched, MAGIC_ATTR) == getattr(patched.__verl_mtp_original__, MAGIC_ATTR)

    # Worker side: the leader had a failing check, another rank none; the verdict is handed out once.
    async def stock_update_weights(self, global_steps=None, mode="auto"):
        return None

    worker_update = _worker_update_weights_returning_drafter_metrics(stock_update_weights)
    ds.DRAFTER_METRICS.post({METRIC_IN_SYNC: 0.0})
    leader = asyncio.run(worker_update(None, global_steps=3, mode="naive"))
    assert leader == {METRIC_IN_SYNC: 0.0}
    assert asyncio.run(worker_update(None, global_steps=3, mode="naive")) is None  # not twice

    # Driver side: the real patched manager method, naive backend; replica 2 was in sync.
    monkeypatch.setattr(ray, "get", lambda refs: refs)
    calls = []

    class WorkerGroup:
        def update_weights(self, global_steps, mode):
            calls.append((global_steps, mode))
            return [leader, None, {METRIC_IN_SYNC: 1.0}, None]

    manager = types.SimpleNamespace(backend="naive", actor_wg=WorkerGroup())
    assert ckpt_base.CheckpointEngineManager.update_weights(manager, 3) == {}
    assert calls == [(3, "naive")]

    response_mask = torch.tensor([[1, 1, 0]])
    batch = DataProto.from_dict(tensors={
        "responses": torch.zeros(1, 3, dtype=torch.long), "response_mask": response_mask,
        "attention_mask": torch.cat([torch.ones(1, 2, dtype=torch.long), response_mask], dim=1),
    }, meta_info={"global_token_num": [4]})
    step = ray_trainer.compute_throughout_metrics(batch=batch, timing_raw={"gen": 0.5, "step": 1.0}, n_gpus=1)
    assert step[METRIC_IN_SYNC] == 0.0  # one replica out of sync makes the step's verdict 0
    step = ray_trainer.compute_throughout_metrics(batch=batch, timing_raw={"gen": 0.5, "step": 1.0}, n_gpus=1)
    assert METRIC_IN_SYNC not in step  # logged once per sync

    # Other backends still run verl's own code.
    other = types.SimpleNamespace(backend="nccl")
    with pytest.raises(AttributeError):
        ckpt_base.CheckpointEngineManager.update_weights(other, 3)


# --- every worker is counted: vLLM data parallelism hides engines 1.. from collective_rpc ---------


class vLLMHttpServer:
    """FAKE of verl 0.9.1's vLLMHttpServer (vllm cannot be imported here): the method body the
    real ``vllm_async_server`` patch expects, so verl-mtp's patch is applied to it as to verl's."""

    def __init__(self, engine):
        self.engine = engine

    async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        await self.engine.collective_rpc(method=method, timeout=timeout, args=args, kwargs=kwargs)


class _DataParallelEngineClient:
    """FAKE of vLLM's AsyncLLM engine client: with data parallelism > 1 (DPLBAsyncMPClient) a
    utility call such as collective_rpc runs on every data-parallel engine's workers, and only
    engine 0's result list comes back (``call_utility_async`` returns the first engine's)."""

    def __init__(self, engines):
        self.engines = engines  # one list of workers per data-parallel engine

    async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        results = [[getattr(w, method)(*args, **(kwargs or {})) for w in engine] for engine in self.engines]
        return results[0]


def _fake_worker_extension():
    class vLLMColocateWorkerExtension:
        """FAKE of verl 0.9.1's vLLM worker extension (see WORKER_SCRIPT): loads each bucket into the
        target and, for method "mtp", into the drafter, unless this worker's sync path skips it."""

        def __init__(self, dp_rank, dp_size, names_shapes, skip_drafter=False):
            self.rank = 0
            self.skip_drafter = skip_drafter
            self.model_runner = types.SimpleNamespace(
                model=torch.nn.Linear(2, 2),
                drafter=types.SimpleNamespace(model=_Drafter(names_shapes)),
                vllm_config=types.SimpleNamespace(
                    speculative_config=types.SimpleNamespace(method="mtp"),
                    model_config=types.SimpleNamespace(hf_config=MIMO),
                    parallel_config=types.SimpleNamespace(data_parallel_size=dp_size, data_parallel_rank=dp_rank),
                ),
            )

        def _get_drafter_model(self):
            return self.model_runner.drafter.model

        def update_weights_from_ipc(self, buckets):
            for bucket in buckets:
                if not self.skip_drafter:
                    self._get_drafter_model().load_weights(bucket)

    return vLLMColocateWorkerExtension


class _Replica:
    """A replica leader's FAKE ServerAdapter (shaped like verl 0.9.1's vLLM ServerAdapter) in front
    of ``data_parallel`` engines of one worker each, with verl-mtp's real patches on the adapter,
    the server and the worker extension."""

    def __init__(self, data_parallel, mode="auto", stale_engines=()):
        from verl_mtp.patches import rollout as patches

        self.restore = []
        stream = _mtp_stream(0)
        is_mtp = mtp_tensor_classifier(MIMO)
        shapes = [(n, tuple(t.shape), t.dtype) for n, t in stream if is_mtp(n)]
        extension = _fake_worker_extension()
        patches.patch_vllm_worker_extension(types.SimpleNamespace(vLLMColocateWorkerExtension=extension), self.restore)
        self.engines = [[extension(dp, data_parallel, shapes, skip_drafter=dp in stale_engines)]
                        for dp in range(data_parallel)]
        server_module = types.SimpleNamespace(vLLMHttpServer=vLLMHttpServer)
        patches.patch_vllm_http_server(server_module, self.restore)
        server = vLLMHttpServer(_DataParallelEngineClient(self.engines))
        workers = [w for engine in self.engines for w in engine]

        class ServerAdapter:
            def __init__(self):
                self._has_server = True
                self.model_config = types.SimpleNamespace(
                    mtp=ExtendedMtpConfig(enable=True, enable_rollout=True, drafter_sync_check=mode), hf_config=MIMO)
                self.config = types.SimpleNamespace(  # verl's RolloutConfig
                    tensor_model_parallel_size=1, pipeline_model_parallel_size=1, data_parallel_size=data_parallel)

            async def update_weights(self, weights, global_steps=None, wire_format="named_tensors", **kwargs):
                sent = list(weights)  # every trainer rank sends the same tensors to its own worker
                for worker in workers:
                    worker.update_weights_from_ipc([sent])

            async def _execute_method(self, method, non_block=False, timeout=None, args=(), kwargs=None):
                return await server.collective_rpc(method, timeout=timeout, args=args, kwargs=kwargs)

        patches.patch_vllm_server_adapter(types.SimpleNamespace(ServerAdapter=ServerAdapter), self.restore)
        self.adapter = ServerAdapter()

    def sync(self, seed):
        import asyncio

        return asyncio.run(self.adapter.update_weights(iter(_mtp_stream(seed)), global_steps=seed))


def test_one_data_parallel_engine_is_all_in_sync_with_its_worker_counted():
    replica = _Replica(data_parallel=1)
    assert replica.sync(0) == IN_SYNC
    report = getattr(replica.engines[0][0], ds.VLLM_REPORT_METHOD)()
    assert report["worker"] == "vllm worker rank 0"


def test_workers_collective_rpc_cannot_see_are_never_reported_in_sync():
    """Data parallel 2, engine 1's drafter stale: vLLM returns only engine 0's report, so the
    check must not claim the replica in sync; it counts 1 of 2 workers and warns once."""
    replica = _Replica(data_parallel=2, stale_engines={1})
    with pytest.warns(DrafterSyncWarning, match=r"saw 1 of 2 engine worker report\(s\) \(tensor 1 x pipeline 1 x data 2 "
                      r"parallel; vLLM's collective_rpc returns only data-parallel engine 0's worker results\)"):
        metrics = replica.sync(0)
    assert METRIC_IN_SYNC not in metrics
    assert metrics == _counts(1, 2)
    # the engine-1 worker did run the report (the fake client reached it) under its own name
    hidden = getattr(replica.engines[1][0], ds.VLLM_REPORT_METHOD)()
    assert hidden["worker"] == "vllm dp engine 1 worker rank 0" and hidden["load_calls"] == 0
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", DrafterSyncWarning)  # the same partial view is not announced again
        assert replica.sync(1) == _counts(1, 2)


def test_a_problem_on_the_engine_it_can_see_still_fails():
    replica = _Replica(data_parallel=2, stale_engines={0})
    with pytest.raises(DrafterOutOfSyncError, match=r"(?s)1 of 2 engine worker report\(s\).*checked.*engine 0 worker rank 0: stale copy"):
        replica.sync(0)


def test_raise_refuses_a_partial_view_at_run_time():
    replica = _Replica(data_parallel=2, mode="raise")
    with pytest.raises(DrafterOutOfSyncError, match=r"(?s)saw 1 of 2 .*NOT verified.*drafter_sync_check=raise requires"):
        replica.sync(0)


def test_an_unknown_worker_count_is_never_in_sync():
    is_mtp, _, recorder, drafter = _setup()
    checker = DrafterSyncChecker(is_mtp, "warn", None, "the rollout config is not available")
    with pytest.warns(DrafterSyncWarning, match=r"saw 1 of an unknown number of engine worker report"):
        assert _sync(checker, _mtp_stream(0), recorder, drafter) == {}


def test_worker_layout_of_a_replica():
    ns = types.SimpleNamespace
    assert ds.vllm_worker_layout(ns(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, data_parallel_size=2)) == (
        8, f"tensor 2 x pipeline 2 x data 2 parallel; {ds.VLLM_DP_REPORTS_NOTE}")
    assert ds.vllm_worker_layout({"tensor_model_parallel_size": 4})[0] == 4  # unset sizes default to 1
    pd = ns(tensor_model_parallel_size=2, disaggregation=ns(decode_tensor_model_parallel_size=4))
    assert ds.vllm_worker_layout(pd, "prefill")[0] == 2 and ds.vllm_worker_layout(pd, "decode")[0] == 4
    pd.disaggregation.decode_tensor_model_parallel_size = None  # decode TP defaults to prefill TP
    assert ds.vllm_worker_layout(pd, "decode")[0] == 2
    assert ds.vllm_worker_layout(None)[0] is None


def test_the_step_metric_claims_in_sync_only_when_every_replica_saw_all_its_workers():
    full, partial = {METRIC_IN_SYNC: 1.0, **_counts(2, 2)}, _counts(1, 2)
    ds.record_worker_sync_results([full, None, partial, None])
    assert ds.pop_driver_drafter_metrics() == {METRIC_WORKERS_CHECKED: 3.0, METRIC_WORKERS_EXPECTED: 4.0,
                                               METRIC_CHECKED_FRACTION: 0.75}
    ds.record_worker_sync_results([full, {METRIC_IN_SYNC: 0.0, **_counts(1, 2)}])
    assert ds.pop_driver_drafter_metrics()[METRIC_IN_SYNC] == 0.0  # a found mismatch stays 0
    ds.record_worker_sync_results([full, full])
    assert ds.pop_driver_drafter_metrics() == {METRIC_IN_SYNC: 1.0, **_counts(4, 4)}


def test_run_config_with_vllm_data_parallelism():
    with pytest.raises(MtpConfigError, match=r"drafter_sync_check='raise' is invalid here: "
                       r"actor_rollout_ref\.rollout\.data_parallel_size=2: .*only 1 of the 2 engines.*valid choices"):
        validate_mtp_run_config(_run_config("vllm", "raise", data_parallel=2))
    for mode in ("auto", "warn"):
        with pytest.warns(DrafterSyncWarning, match="verified on data-parallel engine 0 only"):
            validate_mtp_run_config(_run_config("vllm", mode, data_parallel=2))
    validate_mtp_run_config(_run_config("vllm", "raise", data_parallel=1))
    validate_mtp_run_config(_run_config("vllm", "off", data_parallel=2))
