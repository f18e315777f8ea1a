"""Shared test helpers: synthetic image+text data, the vision tower frozen, state-dict comparisons."""

from __future__ import annotations

import contextlib
import random
import socket

import pytest
import torch
import transformers
from packaging import version
from PIL import Image

from vr_plugin.synthetic import random_scene, render
from vr_plugin.tiny import IMAGE_SIZE, IMAGE_TOKEN_ID, image_token_count

# transformers 4.52 moved HF VLMs' language model under `model.` (model.language_model.layers)
NEW_HF_LAYOUT = version.parse(transformers.__version__) >= version.parse("4.52")


def _cpu_bnb() -> bool:
    """bitsandbytes importable, and a transformers that quantizes with it on CPU: 4.37 raises "No GPU found",
    4.47 trips over bitsandbytes 0.50's device set; transformers 5 works."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return version.parse(transformers.__version__) >= version.parse("4.52")


requires_cpu_bnb = pytest.mark.skipif(
    not _cpu_bnb(), reason="bitsandbytes quantization on CPU needs newer transformers"
)


def synthetic_image(seed: int, size: int = IMAGE_SIZE) -> Image.Image:
    """A PIL picture of the synthetic VQA world (:func:`vr_plugin.synthetic.render` of a scene drawn by ``seed``)."""
    return render(random_scene(random.Random(seed)), size)


def clip_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


class LlavaSynthetic(torch.utils.data.Dataset):
    """``n`` samples of ``[bos] <image tokens> <text>`` with real PIL images through a CLIP image processor."""

    def __init__(self, config, n: int = 8, text_len: int = 6, seed: int = 0):
        processor = clip_processor()
        generator = torch.Generator().manual_seed(seed)
        tokens = image_token_count(config)
        self.samples = []
        for i in range(n):
            pixels = processor(images=synthetic_image(seed * 1000 + i), return_tensors="pt")["pixel_values"]
            text = torch.randint(3, IMAGE_TOKEN_ID - 4, (text_len,), generator=generator)
            ids = torch.cat([torch.tensor([1]), torch.full((tokens,), IMAGE_TOKEN_ID), text])
            labels = torch.where(ids == IMAGE_TOKEN_ID, torch.full_like(ids, -100), ids)
            mask = torch.ones_like(ids)
            self.samples.append({"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": pixels})

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]


def collate(samples):
    """:func:`vr_plugin.data.collate` of :class:`LlavaSynthetic` samples (their lengths are equal: no padding)."""
    from vr_plugin.data import collate as pad_and_stack

    return pad_and_stack(samples, pad_token_id=0)


def snapshot(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def changed(before: dict, model) -> set:
    """Names of parameters that are not bit-identical to ``before``."""
    return {name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())}


def freeze_vision(model) -> None:
    """Freeze the vision tower (not the projector), as LVLM recipes load it: the parameters vr_plugin groups as
    ``vision`` (:func:`vr_plugin.map_parameters`), the one definition of "vision tower" tests use."""
    from vr_plugin import map_parameters

    for info in map_parameters(model):
        if info.group == "vision":
            info.param.requires_grad_(False)


def portable_4bit_path(model):
    """Keep bitsandbytes on its portable 4-bit CPU kernel in eval mode too, and return ``model``.

    On CPUs with AVX512-BF16 (recent Intel Xeon, AMD Zen 4) bitsandbytes repacks 4-bit weights on the first
    eval-mode, no-grad forward and computes in bfloat16 from then on; other CPUs never do. Tests that compare 4-bit
    outputs exactly use this so that they hold on every CPU; ``test_4bit_eval_forward_takes_this_cpus_path`` runs
    the native path.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def forward(model, inputs, **kwargs):
    """``model(**inputs)`` as a first call: Qwen2-VL before transformers 4.52 reuses the previous call's positions."""
    from vr_plugin.score import reset_position_state

    reset_position_state(model)
    return model(**inputs, **kwargs)


def free_port() -> int:
    """A TCP port nobody listens on now, for a launcher's ``--master_port`` (fixed ports collide with other runs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train_sentencepiece(prefix: str, vocab_size: int) -> str:
    """Train a Llama-style sentencepiece BPE model on the synthetic corpus (byte fallback, ``<unk>``/``<s>``/``</s>``
    = 0/1/2, no pad) and return its ``.model`` path."""
    import sentencepiece as spm

    from vr_plugin.synthetic import corpus

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_prefix=prefix,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        split_digits=True,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return prefix + ".model"


def quantize_linears_nf4(module: torch.nn.Module) -> None:
    """Replace every ``nn.Linear`` inside ``module`` by a real bitsandbytes nf4 ``Linear4bit`` holding its weights
    (what a 4-bit ``from_pretrained`` does, for stacks whose transformers refuses to quantize without a GPU)."""
    import bitsandbytes as bnb

    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                quantized = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=torch.float32,
                    quant_type="nf4",
                )
                quantized.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    quantized.bias = child.bias
                setattr(parent, name, quantized.to("cpu"))


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` torch threads, then restore the previous count (tests must leave the process as they
    found it: later ones compare logits bit for bit with fresh interpreters)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
