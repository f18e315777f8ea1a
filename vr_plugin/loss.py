"""The causal-LM loss in chunks of the sequence, so the logits over a large vocabulary never exist whole.

At Llama-3's 128,256-token vocabulary and 2048 positions the logits take 0.5 GB in bf16, the fp32 copy the loss
makes 1 GB, and their gradients as much again. Inside :func:`chunked_loss` the model's own forward runs as usual up
to its ``lm_head``, which hands back the final hidden states instead of logits; the model's ``loss_function`` then
takes ``chunk`` labelled positions at a time through ``lm_head`` and cross-entropy, each chunk recomputed in the
backward pass (``torch.utils.checkpoint``), so the peak holds one chunk's logits. Positions without a label (the
prompt, the image tokens) get no logits at all. The loss is the model's own (the sum over the shifted labels divided
by their count, or by the Trainer's ``num_items_in_batch``), the gradients equal up to float rounding.

Only for models whose forward hands its logits to ``self.loss_function`` (transformers' own classes since 4.46,
most VLMs); others, and forwards that rescale the logits first (``logit_scale``, ``logits_scaling``), are refused by
name. Where the forward soft-caps the logits (Gemma's ``final_logit_softcapping``), each chunk is soft-capped.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Iterator, Optional

IGNORE_INDEX = -100  # the label the loss skips (vr_plugin.data masks prompts and images with it)
DEFAULT_LOSS_CHUNK = 256  # positions: 0.13 GB of fp32 logits at a 128k vocabulary (benchmarks/chunked_loss.py)
# config fields a forward may rescale its logits by between lm_head and the loss (Cohere, Granite): not reproduced
UNSUPPORTED_SCALINGS = ("logit_scale", "logits_scaling")


def _owner(model: Any) -> Any:
    """The ``PreTrainedModel`` under DDP / DeepSpeed / PEFT wrappers that owns ``lm_head`` and ``loss_function``."""
    from .locate import unwrap_model

    return unwrap_model(model)


def _forward_source(owner: Any) -> str:
    """The source of the model class's ``forward``: what it does between ``lm_head`` and the loss."""
    return _class_forward_source(type(owner))


@functools.cache
def _class_forward_source(cls: type) -> str:
    """Read once per class: :func:`chunked_loss` checks it at every training step."""
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError) as error:
        raise ValueError(f"loss_chunk: cannot read {cls.__name__}.forward to check its loss ({error})") from None


def check_chunkable(model: Any) -> None:
    """Raise ``ValueError`` naming why ``model``'s loss cannot be computed in chunks (before any step runs)."""
    owner = _owner(model)
    name = type(owner).__name__
    if owner.get_output_embeddings() is None:
        raise ValueError(f"loss_chunk: {name} has no lm_head (get_output_embeddings() is None)")
    source = _forward_source(owner)
    if "self.loss_function(" not in source:
        raise ValueError(f"loss_chunk: {name} computes its loss itself, not through loss_function; drop loss_chunk")
    for field in UNSUPPORTED_SCALINGS:
        if field in source:
            raise ValueError(f"loss_chunk: {name} rescales its logits by {field} before the loss; drop loss_chunk")


def _softcap(owner: Any) -> Optional[float]:
    """Gemma's final logit soft-capping, where the model's forward applies it (its VLM classes do not)."""
    if "final_logit_softcapping" not in _forward_source(owner):
        return None
    return getattr(owner.config.get_text_config(), "final_logit_softcapping", None)


def _chunk_sum(head: Any, hidden: Any, targets: Any, softcap: Optional[float]) -> Any:
    """Summed cross-entropy of one chunk: ``head`` (a module or any callable), fp32, soft-capping where set."""
    import torch
    import torch.nn.functional as F

    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(
    head: Any,
    hidden: Any,
    labels: Any,
    chunk: int = DEFAULT_LOSS_CHUNK,
    num_items_in_batch: Any = None,
    shift_labels: Any = None,
    softcap: Optional[float] = None,
) -> Any:
    """transformers' causal-LM loss of ``head(hidden)`` against ``labels`` (shifted by one), ``chunk`` labelled
    positions at a time, each recomputed in backward; ``shift_labels`` given means already shifted."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    keep = targets != IGNORE_INDEX
    states, targets = hidden.reshape(-1, hidden.shape[-1])[keep], targets[keep]
    total = hidden.sum() * 0.0  # a graph even when no position has a label
    for start in range(0, len(targets), chunk):
        piece = slice(start, start + chunk)
        total = total + checkpoint(_chunk_sum, head, states[piece], targets[piece], softcap, use_reentrant=False)
    denominator = num_items_in_batch if num_items_in_batch is not None else keep.sum()
    if torch.is_tensor(denominator):
        denominator = denominator.to(total.device)
    return total / denominator


class _Chunked:
    """The two stand-ins :func:`chunked_loss` installs: ``lm_head``'s forward and the model's ``loss_function``.

    The chunks reach ``lm_head`` through :meth:`logits_of`, which calls the module (its hooks run: ZeRO-3 gathers
    the weight) with the capture switched to pass-through, also when the backward pass recomputes a chunk inside
    the block.
    """

    def __init__(self, head: Any, chunk: int, softcap: Optional[float]):
        self.head, self.chunk, self.softcap = head, chunk, softcap
        self.own_forward = head.__dict__.get("forward")  # an instance forward already there (accelerate's hooks)
        self.hidden, self.calls, self.passing = None, 0, 0

    def capture(self, hidden: Any) -> Any:
        if self.passing:
            forward = self.own_forward or type(self.head).forward.__get__(self.head)
            return forward(hidden)
        self.hidden = hidden
        return hidden[..., :0]  # no logits; the loss below computes them chunk by chunk

    def logits_of(self, hidden: Any) -> Any:
        self.passing += 1
        try:
            return self.head(hidden)
        finally:
            self.passing -= 1

    def loss_function(self, logits: Any = None, labels: Any = None, vocab_size: Any = None, **kwargs: Any) -> Any:
        if self.hidden is None:
            raise RuntimeError("loss_chunk: the model called loss_function without calling lm_head first")
        hidden, self.hidden = self.hidden, None
        self.calls += 1
        options = {key: kwargs.get(key) for key in ("num_items_in_batch", "shift_labels")}
        return chunked_cross_entropy(self.logits_of, hidden, labels, self.chunk, softcap=self.softcap, **options)

    def install(self) -> None:
        self.head.forward = self.capture

    def restore(self) -> None:
        if self.own_forward is None:
            self.head.__dict__.pop("forward", None)
        else:
            self.head.forward = self.own_forward


@contextlib.contextmanager
def chunked_loss(model: Any, chunk: int = DEFAULT_LOSS_CHUNK) -> Iterator[_Chunked]:
    """Inside the block, ``model(**batch)`` with ``labels`` computes its loss ``chunk`` labelled positions at a time
    (see the module doc); its ``logits`` come back empty. Yields a probe whose ``calls`` counts the losses computed.

    Raises ``ValueError`` first where the model's loss cannot be chunked (:func:`check_chunkable`).
    """
    if chunk < 1:
        raise ValueError(f"loss_chunk must be >= 1 positions, got {chunk}")
    check_chunkable(model)
    owner = _owner(model)
    probe = _Chunked(owner.get_output_embeddings(), chunk, _softcap(owner))
    saved_loss = owner.__dict__.get("_loss_function")
    probe.install()
    owner.loss_function = probe.loss_function
    try:
        yield probe
    finally:
        probe.restore()
        if saved_loss is not None:
            owner.loss_function = saved_loss
        else:
            owner.__dict__.pop("_loss_function", None)
