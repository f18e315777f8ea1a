"""Tiny local Bunny ingredients: one base LLM per ``--model_type``, a SigLIP tower, a stage-1 projector, data.

Everything is built here from configs (random weights, locally trained tokenizers) and saved to a directory,
then loaded by Bunny's own ``train()`` with ``from_pretrained``.  The LLMs are saved with the model classes
Bunny vendors (``bunny/model/language_model/*``), as the base checkpoints Bunny fine-tunes from would be, so
the Bunny checkout named by ``VR_BUNNY_REPO`` must be importable; that only works inside the ``bunny`` stack
(transformers 4.47, see ``tests/stacks.py``).

Each tokenizer reproduces what Bunny's preprocessing relies on for the backbone's conversation template
(``bunny/conversation.py``, ``bunny/util/data_utils.py``): whether a BOS is prepended, the end-of-turn string
being one special token, which token pads.  Otherwise Bunny masks every label ("tokenization mismatch").
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from vr_plugin.synthetic import corpus, make_vqa_dataset

from ..common import train_sentencepiece
from ..stacks import current

if TYPE_CHECKING:
    import subprocess

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase

HIDDEN = 64
VISION_HIDDEN = 32
IMAGE = 32
PATCH = 8
BPE_VOCAB = 512
SPM_VOCAB = 400
LLAMA3_BOS, LLAMA3_EOS = 128000, 128001  # Bunny's train() hard-codes eos_token_id = 128001 for llama3-8b


@dataclass(frozen=True)
class Backbone:
    """What Bunny does with one ``--model_type``: template, vendored module, layer path and LoRA targets."""

    model_type: str
    version: str  # --version: the conversation template Bunny's scripts use for it
    module: str  # Bunny's vendored modeling module of the base LLM
    causal_lm: str  # its *ForCausalLM class, used to write the base checkpoint
    config: str  # its config class (imported by that module)
    bunny_class: str  # what train() instantiates
    layer_class: str  # decoder layer class name
    lora_targets: tuple  # what Bunny's find_all_linear_names returns (suffixes)
    layers: str = "model.layers"  # decoder ModuleList inside the Bunny model (PeftModel: base_model.model. + this)
    layer_idx: bool = True  # self_attn carries layer_idx (StableLM: no, legacy tuple cache indexed by position)
    depth_scaled: bool = False  # each layer keeps num_hidden_layers for its residual scale (MiniCPM)


_LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LM = "bunny.model.language_model."
BACKBONES = {
    b.model_type: b
    for b in (
        Backbone("phi-1.5", "bunny", _LM + "phi.modeling_phi", "PhiForCausalLM", "PhiConfig",
                 "BunnyPhiForCausalLM", "PhiDecoderLayer", ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")),
        Backbone("phi-2", "bunny", _LM + "phi.modeling_phi", "PhiForCausalLM", "PhiConfig",
                 "BunnyPhiForCausalLM", "PhiDecoderLayer", ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")),
        Backbone("phi-3", "phi3", _LM + "phi3.modeling_phi3", "Phi3ForCausalLM", "Phi3Config",
                 "BunnyPhi3ForCausalLM", "Phi3DecoderLayer", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
        Backbone("stablelm-2", "bunny", _LM + "stable_lm.modeling_stablelm_epoch", "StableLMEpochForCausalLM",
                 "StableLMEpochConfig", "BunnyStableLMForCausalLM", "DecoderLayer", _LLAMA_LIKE, layer_idx=False),
        Backbone("qwen1.5-1.8b", "bunny", _LM + "qwen2.modeling_qwen2", "Qwen2ForCausalLM", "Qwen2Config",
                 "BunnyQwen2ForCausalLM", "Qwen2DecoderLayer", _LLAMA_LIKE),
        Backbone("minicpm", "minicpm", _LM + "minicpm.modeling_minicpm", "MiniCPMForCausalLM", "MiniCPMConfig",
                 "BunnyMiniCPMForCausalLM", "MiniCPMDecoderLayer", _LLAMA_LIKE, depth_scaled=True),
        Backbone("llama3-8b", "llama", _LM + "llama.modeling_llama", "LlamaForCausalLM", "LlamaConfig",
                 "BunnyLlamaForCausalLM", "LlamaDecoderLayer", _LLAMA_LIKE),
    )
}  # fmt: skip
MODEL_TYPES = tuple(BACKBONES)


def backbone(model_type: str) -> Backbone:
    """The :class:`Backbone` of a Bunny ``--model_type`` (decoder path, LoRA suffixes, template)."""
    if model_type not in BACKBONES:
        raise ValueError(f"unknown Bunny model_type {model_type!r}; choose from {', '.join(MODEL_TYPES)}")
    return BACKBONES[model_type]


def bunny_repo(repo: Optional[str] = None) -> str:
    """The Bunny checkout (argument or ``VR_BUNNY_REPO``), put on ``sys.path``; raise if there is none."""
    repo = repo or os.environ.get("VR_BUNNY_REPO")
    if not repo or not os.path.isdir(os.path.join(repo, "bunny")):
        raise RuntimeError("set VR_BUNNY_REPO to a BAAI-DCAI/Bunny checkout")
    repo = os.path.abspath(repo)
    if repo not in sys.path:
        sys.path.insert(0, repo)
    return repo


# --- tokenizers ---------------------------------------------------------------------------------------------


def _byte_level_bpe(special: list, vocab_size: int = BPE_VOCAB) -> Tokenizer:
    """A GPT-2 style byte-level BPE ``tokenizers.Tokenizer`` trained on the synthetic corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer)
    return tokenizer


def gpt2_style_tokenizer(out_dir: str, model_type: str) -> PreTrainedTokenizerBase:
    """phi-1.5/phi-2 (CodeGen), stablelm-2 (GPT-2) or qwen1.5 (Qwen2) fast tokenizer: no BOS, ``<|endoftext|>`` ends."""
    from transformers import CodeGenTokenizerFast, GPT2TokenizerFast, Qwen2TokenizerFast

    end = "<|endoftext|>"
    if model_type == "qwen1.5-1.8b":
        # like Qwen1.5's base tokenizer: no BOS, no unk; pad = eos = <|endoftext|> (train() cannot fall back to unk)
        raw = _byte_level_bpe([end, "<|im_start|>", "<|im_end|>"])
        tokenizer = Qwen2TokenizerFast(tokenizer_object=raw, unk_token=None, bos_token=None, eos_token=end,
                                       pad_token=end)  # fmt: skip
    elif model_type == "stablelm-2":
        raw = _byte_level_bpe([end])
        tokenizer = GPT2TokenizerFast(tokenizer_object=raw, bos_token=end, eos_token=end, unk_token=end)
    else:  # phi: bos = eos = unk = <|endoftext|>; train() pads with unk
        raw = _byte_level_bpe([end])
        tokenizer = CodeGenTokenizerFast(tokenizer_object=raw, bos_token=end, eos_token=end, unk_token=end)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def llama3_tokenizer(out_dir: str) -> PreTrainedTokenizerBase:
    """A Llama-3 style fast tokenizer: BOS ``<|begin_of_text|>`` = 128000 prepended, ``<|end_of_text|>`` = 128001.

    Bunny's train() sets ``eos_token_id = 128001`` for llama3-8b, so the tiny byte-level BPE vocabulary is padded
    with unreachable filler tokens up to id 128000, and 256 special tokens follow (len 128256, as Llama 3).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    trained = _byte_level_bpe([])
    model = json.loads(trained.to_str())["model"]
    vocab = dict(model["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    vocab.update({f"<|filler_{i}|>": i for i in range(len(vocab), LLAMA3_BOS)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(254)]
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    assert tokenizer.token_to_id("<|end_of_text|>") == LLAMA3_EOS
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", LLAMA3_BOS)],
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>")  # fmt: skip
    fast.save_pretrained(out_dir)
    return fast


def sentencepiece_tokenizer(out_dir: str, *, add_bos: bool, extra_eos: Optional[str] = None) -> PreTrainedTokenizerBase:
    """A Llama-style sentencepiece fast tokenizer (``<unk>``/``<s>``/``</s>`` = 0/1/2), for minicpm and phi-3.

    ``extra_eos`` adds that string as a special token and makes it eos and pad (Phi-3's ``<|endoftext|>``).
    """
    from transformers import LlamaTokenizerFast

    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(out_dir, "tokenizer")
    model_file = train_sentencepiece(prefix, SPM_VOCAB)
    kwargs = {"eos_token": extra_eos, "pad_token": extra_eos} if extra_eos else {}
    tokenizer = LlamaTokenizerFast(vocab_file=model_file, add_bos_token=add_bos, add_eos_token=False,
                                   legacy=False, from_slow=True, **kwargs)  # fmt: skip
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def build_tokenizer(out_dir: str, model_type: str) -> PreTrainedTokenizerBase:
    """The tokenizer a backbone's real checkpoint ships, in miniature, saved to ``out_dir``."""
    if model_type == "llama3-8b":
        return llama3_tokenizer(out_dir)
    if model_type == "minicpm":  # MiniCPM: Llama sentencepiece, BOS added, </s> ends a turn, pad = unk
        return sentencepiece_tokenizer(out_dir, add_bos=True)
    if model_type == "phi-3":  # Phi-3 (June 2024 update): no BOS, eos = pad = <|endoftext|>
        return sentencepiece_tokenizer(out_dir, add_bos=False, extra_eos="<|endoftext|>")
    return gpt2_style_tokenizer(out_dir, model_type)


# --- models ---------------------------------------------------------------------------------------------------


def _round_up(n: int, multiple: int = 64) -> int:
    return (n + multiple - 1) // multiple * multiple


def llm_config_kwargs(model_type: str, tokenizer: PreTrainedTokenizerBase, num_layers: int = 8) -> dict:
    """Config keyword arguments of a tiny base LLM for ``model_type`` (vocabulary sized to the tokenizer)."""
    common = dict(
        vocab_size=_round_up(len(tokenizer)),
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if model_type in ("phi-1.5", "phi-2"):
        return dict(common, num_key_value_heads=4, partial_rotary_factor=0.5, hidden_act="gelu_new")
    if model_type == "phi-3":
        return dict(common, num_key_value_heads=4, pad_token_id=tokenizer.pad_token_id,
                    original_max_position_embeddings=512)  # fmt: skip
    if model_type == "stablelm-2":
        return dict(common, num_key_value_heads=4, rope_pct=0.25, use_qkv_bias=True)
    if model_type == "qwen1.5-1.8b":
        return dict(common, num_key_value_heads=4, max_window_layers=num_layers, tie_word_embeddings=False)
    if model_type == "minicpm":  # MiniCPM-2B's scale_emb / scale_depth (muP); embeddings tied as in the real model
        return dict(common, num_key_value_heads=4, scale_emb=12, dim_model_base=16, scale_depth=1.4,
                    tie_word_embeddings=True)  # fmt: skip
    if model_type == "llama3-8b":
        return dict(common, vocab_size=LLAMA3_BOS + 256, num_key_value_heads=2, rope_theta=500000.0)
    raise ValueError(f"unknown Bunny model_type {model_type!r}")


def llm_dir(out_dir: str, model_type: str, num_layers: int = 8, seed: int = 0, repo: Optional[str] = None) -> str:
    """A tiny base LLM of ``model_type`` (Bunny's vendored class) with its tokenizer, saved with save_pretrained."""
    bunny_repo(repo)
    spec = backbone(model_type)
    tokenizer = build_tokenizer(out_dir, model_type)
    module = importlib.import_module(spec.module)
    config = getattr(module, spec.config)(**llm_config_kwargs(model_type, tokenizer, num_layers))
    torch.manual_seed(seed)
    model = getattr(module, spec.causal_lm)(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def siglip_dir(out_dir: str, seed: int = 0) -> str:
    """A tiny SigLIP vision tower with its ``SiglipImageProcessor`` (Bunny picks SigLIP when the path has 'sig')."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    if "sig" not in os.path.basename(os.path.normpath(out_dir)).lower():
        raise ValueError("Bunny only treats a vision tower as SigLIP when its path contains 'sig'")
    torch.manual_seed(seed)
    config = SiglipVisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=2 * VISION_HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=IMAGE,
        patch_size=PATCH,
    )
    SiglipVisionModel(config).save_pretrained(out_dir, safe_serialization=True)
    SiglipImageProcessor(size={"height": IMAGE, "width": IMAGE}).save_pretrained(out_dir)
    return out_dir


def projector_bin(path: str, hidden: int = HIDDEN, seed: int = 0) -> str:
    """A stage-1 ``mm_projector.bin`` (mlp2x_gelu) like Bunny's pretrain output."""
    torch.manual_seed(seed)
    mlp = torch.nn.Sequential(torch.nn.Linear(VISION_HIDDEN, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden))
    torch.save({f"model.mm_projector.{k}": v for k, v in mlp.state_dict().items()}, path)
    return path


def bunny_workspace(
    root: str, model_type: str, num_layers: int = 8, n_train: int = 16, repo: Optional[str] = None
) -> dict:
    """Everything a Bunny finetune run of ``model_type`` needs, under ``root``; return the paths."""
    backbone(model_type)
    paths = {
        "llm": llm_dir(os.path.join(root, f"{model_type}-tiny"), model_type, num_layers, repo=repo),
        "siglip": siglip_dir(os.path.join(root, "siglip-tiny")),
        "projector": projector_bin(os.path.join(root, "mm_projector.bin")),
    }
    data = make_vqa_dataset(os.path.join(root, "data"), n_train=n_train, n_test=4, image_size=IMAGE)
    paths.update(data=data["train"], images=data["images"], test=data["test"], calibration=data["calibration"])
    return paths


def workspace_factory(tmp_path_factory: Any) -> Callable[[str], dict]:
    """``get(model_type)`` building :func:`bunny_workspace` once per model_type under pytest's ``tmp_path_factory``."""
    built: dict = {}

    def get(model_type: str) -> dict:
        if model_type not in built:
            built[model_type] = bunny_workspace(str(tmp_path_factory.mktemp(model_type)), model_type)
        return built[model_type]

    return get


def _has_eval_strategy() -> bool:
    import transformers
    from packaging import version

    return version.parse(transformers.__version__) >= version.parse("4.46")


def finetune_flags(paths: dict, model_type: str, output_dir: str, lora: bool = False, steps: int = 2) -> list:
    """Bunny's script/train/finetune_full.sh (or finetune_lora.sh) flags, shrunk to a CPU run of a few steps.

    Shrunk: no DeepSpeed, fp32 (``--bf16 False``; no ``--tf32``, which needs a GPU), ``steps`` steps of batch 2,
    ``model_max_length`` 256, no saving before the end, no dataloader workers, LoRA rank 4.  Learning rates are the
    scripts' (2e-5 full, 2e-4 LoRA with ``--mm_projector_lr 2e-5``); a flag appended later overrides one here.
    """
    flags = [
        "--model_name_or_path", paths["llm"],
        "--model_type", model_type,
        "--version", backbone(model_type).version,
        "--data_path", paths["data"],
        "--image_folder", paths["images"],
        "--vision_tower", paths["siglip"],
        "--pretrain_mm_mlp_adapter", paths["projector"],
        "--mm_projector_type", "mlp2x_gelu",
        "--image_aspect_ratio", "pad",
        "--group_by_modality_length", "False",
        "--bf16", "False",
        "--output_dir", output_dir,
        "--max_steps", str(steps),
        "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "2",
        "--gradient_accumulation_steps", "1",
        "--eval_strategy" if _has_eval_strategy() else "--evaluation_strategy", "no",
        "--save_strategy", "no",
        "--learning_rate", "2e-4" if lora else "2e-5",
        "--weight_decay", "0.",
        "--warmup_ratio", "0.03",
        "--lr_scheduler_type", "cosine",
        "--logging_steps", "1",
        "--model_max_length", "256",
        "--gradient_checkpointing", "True",
        "--dataloader_num_workers", "0",
        "--lazy_preprocess", "True",
        "--report_to", "none",
        "--seed", "0",
    ]  # fmt: skip
    if lora:
        flags = ["--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8", "--mm_projector_lr", "2e-5", *flags]
    return flags


# --- running Bunny ----------------------------------------------------------------------------------------------


def bunny_ready() -> bool:
    """Whether Bunny can run here: ``VR_BUNNY_REPO`` names a checkout and this is the ``bunny`` stack."""
    repo = os.environ.get("VR_BUNNY_REPO", "")
    return bool(repo) and os.path.isdir(os.path.join(repo, "bunny")) and current() == "bunny"


def run_bunny(
    args: list,
    cwd: str,
    module: str = "bunny.train.train",
    repo: Optional[str] = None,
    timeout: int = 600,
    stdin: Optional[str] = None,
) -> subprocess.CompletedProcess:
    """Run ``python -m <module> <args>`` in a subprocess with the Bunny checkout on ``PYTHONPATH``; never raises."""
    import subprocess

    env = dict(os.environ, PYTHONPATH=bunny_repo(repo), TOKENIZERS_PARALLELISM="false")
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny tensors: extra threads only cost time, more so on a busy machine
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin,
    )


def logged_losses(output: str) -> list:
    """The per-step ``'loss'`` values the HF Trainer printed (``{'loss': 6.25, 'grad_norm': ...}``)."""
    import re

    return [float(value) for value in re.findall(r"'loss': ([^,}]+)", output)]
