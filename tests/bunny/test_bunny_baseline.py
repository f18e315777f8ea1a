"""Bunny's real, unmodified ``train()`` on tiny local backbones: every ``--model_type``, full-parameter and LoRA.

Each run is ``python -m bunny.train.train <flags>`` in a subprocess.  Needs a Bunny checkout (``VR_BUNNY_REPO``)
and the ``bunny`` stack (``VR_STACK=bunny``); skipped otherwise.
"""

import math
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from .fixtures import MODEL_TYPES, bunny_ready, bunny_workspace, finetune_flags, logged_losses, run_bunny

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
    pool = ThreadPoolExecutor(max_workers=JOBS)
    started = {}
    for model_type in dict.fromkeys(m for m, _ in wanted):
        root = tmp_path_factory.mktemp(model_type)
        paths = bunny_workspace(str(root), model_type)
        for lora in sorted({lora for m, lora in wanted if m == model_type}):
            output_dir = str(root / (("bunny-lora-" if lora else "bunny-") + model_type))
            flags = finetune_flags(paths, model_type, output_dir, lora=lora)
            started[model_type, lora] = (pool.submit(run_bunny, flags, cwd=str(root)), output_dir)
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
