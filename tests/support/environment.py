"""The test environment, set when this module is first imported (tests/conftest.py imports it
before anything else, so before torch / transformers / datasets are imported by any test).

Everything that runs LLaMA-Factory must stay offline and must not touch the user's caches; every
subprocess (torchrun workers included) inherits what is set here.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = TESTS_DIR.parent
DATA_DIR = REPO_ROOT / "data"
QUICKSTART_YAML = REPO_ROOT / "examples" / "train_lora" / "quickstart_cpu.yaml"

HF_HOME = tempfile.mkdtemp(prefix="dataflex-tests-hf-")
atexit.register(shutil.rmtree, HF_HOME, ignore_errors=True)  # also after --collect-only
os.environ.update(
    {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "DISABLE_VERSION_CHECK": "1",
        "HF_HOME": HF_HOME,
        "HF_DATASETS_CACHE": os.path.join(HF_HOME, "datasets"),
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_DISABLED": "true",
        # through the product's plugin hook, in every training process (torchrun workers too): the
        # diagnostics trace (DATAFLEX_TRACE_DIR) and tests/plugins/faults.py (pauses, injected
        # faults); both inert unless their own variables are set
        "DATAFLEX_PLUGINS": "dataflex.diagnostics,plugins.faults",
        # the workers import plugins.faults from tests/
        "PYTHONPATH": os.pathsep.join([str(TESTS_DIR)]
                                      + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
    }
)
# Where xdist workers leave the test groups for the controller's scheduler (tests/conftest.py); set
# here, before the warm CLI takes its copy of the environment.
GROUPS_ENV = "DATAFLEX_TEST_GROUPS_FILE"
if not os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ[GROUPS_ENV] = os.path.join(HF_HOME, "xdist-groups.json")
# Tiny model on a small shared CPU: one thread per process avoids oversubscription (torchrun
# sets the same default for its workers). Same value for every run, so comparisons stay exact.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

# Variables that change how a run is launched or traced: never inherited from the caller's shell.
_LAUNCH_VARS = (
    "FORCE_TORCHRUN", "NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
    "RDZV_ID", "MIN_NNODES", "MAX_NNODES", "MAX_RESTARTS", "USE_RAY", "USE_KT", "USE_MCA", "USE_V1",
    "ALLOW_EXTRA_ARGS", "DATAFLEX_TRACE_DIR", "DATAFLEX_TEST_FAULT", "DATAFLEX_TEST_PAUSE_AT_STEP",
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
)
for _var in _LAUNCH_VARS:
    os.environ.pop(_var, None)

