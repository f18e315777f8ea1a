"""Bunny's real, unmodified ``train()`` on tiny local backbones: every ``--model_type``, full-parameter and LoRA.

Each run is ``python -m bunny.train.train <flags>`` in a subprocess.  Needs a Bunny checkout (``VR_BUNNY_REPO``)
and the ``bunny`` stack (``VR_STACK=bunny``); skipped otherwise.
"""

import math
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from .fixtures import MODEL_TYPES, bunny_ready, finetune_flags, logged_losses, run_bunny, workspace_factory

pytestmark = pytest.mark.skipif(not bunny_ready(), reason="needs VR_BUNNY_REPO (a Bunny checkout) and VR_STACK=bunny")

LORA_FILES = {"adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.bin", "config.json"}
JOBS = int(os.environ.get("VR_BUNNY_JOBS", min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """The selected (model_type, lora) runs, started up front ``JOBS`` at a time; one workspace per model_type."""
    wanted = [
        (item.callspec.params["model_type"], item.callspec.params["lora"])
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec")
    ]
    workspace = workspace_factory(tmp_path_factory)
    pool = ThreadPoolExecutor(max_workers=JOBS)
    started = {}
    for model_type, lora in wanted:
        run_dir = tmp_path_factory.mktemp("run")
        output_dir = str(run_dir / (("bunny-lora-" if lora else "bunny-") + model_type))  # Bunny's builder reads 'lora'
        flags = finetune_flags(workspace(model_type), model_type, output_dir, lora=lora)
        started[model_type, lora] = (pool.submit(run_bunny, flags, cwd=str(run_dir)), output_dir)
    yield started
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_bunny_train_runs(runs, model_type, lora):
    future, output_dir = runs[model_type, lora]
    run = future.result()
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-6000:]
    assert "tokenization mismatch" not in log, "Bunny masked every label of a sample"
    losses = logged_losses(log)
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses), losses
    files = set(os.listdir(output_dir))
    if lora:
        assert LORA_FILES <= files, files
        extra = torch.load(os.path.join(output_dir, "non_lora_trainables.bin"), map_location="cpu")
        assert extra and all("mm_projector" in name for name in extra), sorted(extra)  # LoRA mode trains the projector
    else:
        assert "config.json" in files and any(f.endswith(".safetensors") for f in files), files
