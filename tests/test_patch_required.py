"""A patch the run's MTP config needs that did not apply stops the run at the engine's
initialisation (and at the actor loss), naming the patch, its error and the versions; a run
without MTP is untouched. megatron-core's version is checked at run time.

Each case runs in a fresh interpreter (``run_python``), where verl's real modules are imported
with the plugin active and one real patch is made to fail against a broken target.
"""

import json


def _result(proc):
    assert proc.returncode == 0, proc.stderr
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT=")][-1]
    return json.loads(line[len("RESULT="):])


ENGINE_INIT_WITH_BROKEN_SCHEDULE_PATCH = """
import json, sys
import verl.workers.engine.base as base
from verl_mtp import plugin
from verl_mtp.patches import catalog as patches
plugin.deactivate((patches.OCC_UPDATE_SCHEDULE,))
# A verl whose BaseEngine.train_batch lost its loss_function parameter: the patch must refuse it.
def train_batch(self, data):
    raise AssertionError("never called")
base.BaseEngine.train_batch = train_batch
plugin.apply_patches((patches.OCC_UPDATE_SCHEDULE,))  # runs its step on the (broken) module now
from types import SimpleNamespace
import verl.workers.engine.megatron.transformer_impl as engine_module
from verl_mtp.config import ExtendedMtpConfig
result = {"status": plugin.status()["occ_update_schedule"]}
for name, mtp in {
    "occ": ExtendedMtpConfig(mtp_training_mode="joint", mtp_loss_type="rl", mtp_coef_mode="occ"),
    "fixed": ExtendedMtpConfig(mtp_training_mode="joint", mtp_loss_type="rl"),
    "off": ExtendedMtpConfig(),
}.items():
    try:
        # verl's engine calls this in its initialisation (before touching the model when MTP is on).
        engine_module.patch_engine_mtp([], SimpleNamespace(mtp=mtp))
        result[name] = "ok"
    except Exception as exc:
        result[name] = type(exc).__name__ + ": " + str(exc)
print("RESULT=" + json.dumps(result))
"""


def test_engine_init_stops_when_a_needed_patch_failed(run_python):
    result = _result(run_python(ENGINE_INIT_WITH_BROKEN_SCHEDULE_PATCH))
    assert "train_batch(self, data, loss_function) not found" in result["status"]
    message = result["occ"]
    assert message.startswith("PatchNotActiveError")
    assert "patch 'occ_update_schedule'" in message and "not found" in message
    assert "megatron-core 0.1" in message and "verl 0.9.1" in message  # the versions found
    assert "the Megatron engine's initialisation" in message
    assert result["fixed"] == "ok"  # fixed lambda does not need the schedule patch
    assert result["off"] == "ok"  # a run without MTP never needs the patches


LOSS_WITH_BROKEN_FORWARD_PATCH = """
import json
import verl.workers.engine.megatron.transformer_impl as engine_module
from verl_mtp import plugin
from verl_mtp.patches import catalog as patches
plugin.deactivate((patches.MTP_FORWARD,))
# A verl whose logits processor lost its temperature parameter: the MTP forward patch refuses it,
# so verl-mtp's engine-initialisation hook (which rides on that patch) is absent too.
def processor(self, logits, label, **kwargs):
    raise AssertionError("never called")
engine_module.MegatronEngineWithLMHead._lm_head_logits_processor = processor
plugin.apply_patches((patches.MTP_FORWARD,))
from verl.workers import engine_workers
from verl_mtp.config import ExtendedMtpConfig
from verl_mtp.local_megatron import engine_step
config = engine_step.actor_config(ExtendedMtpConfig(mtp_training_mode="standalone", mtp_loss_type="ce"))
try:
    engine_workers.ppo_loss(config, {}, None)
    result = "ok"
except Exception as exc:
    result = type(exc).__name__ + ": " + str(exc)
print("RESULT=" + json.dumps(result))
"""


def test_actor_loss_stops_when_the_forward_patch_failed(run_python):
    message = _result(run_python(LOSS_WITH_BROKEN_FORWARD_PATCH))
    assert message.startswith("PatchNotActiveError"), message
    assert "patch 'mtp_forward'" in message and "temperature" in message
    assert "the actor loss" in message


UNSUPPORTED_MEGATRON_CORE = """
import json
import importlib.metadata as metadata
real_version = metadata.version
metadata.version = lambda name: "0.20.0" if name == "megatron-core" else real_version(name)
from verl_mtp.config import ExtendedMtpConfig
from verl_mtp.patches.core import require_patches
try:
    require_patches(ExtendedMtpConfig(mtp_training_mode="standalone"), "test")
    result = "ok"
except Exception as exc:
    result = type(exc).__name__ + ": " + str(exc)
print("RESULT=" + json.dumps(result))
"""


def test_unsupported_megatron_core_is_refused_at_run_time(run_python):
    message = _result(run_python(UNSUPPORTED_MEGATRON_CORE))
    assert message.startswith("PatchNotActiveError")
    assert "megatron-core 0.20.0 is not a version verl-mtp supports (>=0.16.0,<0.19)" in message


def test_healthy_install_passes_the_check():
    from verl_mtp.config import ExtendedMtpConfig
    from verl_mtp.patches.core import require_patches

    for mtp in (
        ExtendedMtpConfig(mtp_training_mode="joint", mtp_loss_type="rl", mtp_coef_mode="occ"),
        ExtendedMtpConfig(mtp_training_mode="standalone"),
    ):
        require_patches(mtp, "test")  # raises if anything this process imported is unpatched
