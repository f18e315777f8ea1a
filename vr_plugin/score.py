"""Layer importance scores, computed from hidden states as they are produced (forward hooks).

Activation metrics compare a layer's input ``h_i`` with its output ``h_{i+1}`` per token, in fp32, over
real tokens only (padding masked):

* ``bi``: Block Influence (ShortGPT, the paper's scoring script): ``1 - mean_t cos(h_i, h_{i+1})``;
* ``bi_image`` / ``bi_text``: the same over image tokens / text tokens only (real image-token positions);
* ``bi_multimodal``: the paper's multimodal BI, the mean of ``bi_image`` and ``bi_text``;
* ``angular``: Gromov et al.'s angular distance ``mean_t arccos(cos(h_i, h_{i+n})) / pi`` over ``n``
  consecutive layers (key: the block's first layer; ``last_token=True`` uses only each sample's last token).

Weight metric (no data): ``weight_change``: the paper's ``sum_W ||W' - W|| / ||W||`` over the linear weights of
each layer, between a trained model and its ``reference`` (base) model.

For every metric a higher score means a more important layer; pruning removes the lowest. Each layer's input
is held only until its output arrives (``n`` inputs for ``angular``), so memory does not grow with depth.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from .distributed import gathered, zero3_hooked, zero3_partitioned
from .io import write_json
from .locate import find_decoder_layers, unwrap_model

__all__ = ["METRICS", "ScoreReport", "score_layers", "save_scores", "load_scores", "image_token_mask"]

logger = logging.getLogger(__name__)

METRICS = ("bi", "bi_image", "bi_text", "bi_multimodal", "angular", "weight_change")
_NEEDS_IMAGE_MASK = ("bi_image", "bi_text", "bi_multimodal")


@dataclass
class ScoreReport:
    """Scores per layer plus what they were computed from; saved as JSON."""

    metric: str
    scores: dict
    num_layers: int
    model: str = ""
    data: str = ""
    n: int = 1
    tokens: int = 0
    extra: dict = field(default_factory=dict)
    identity: dict = field(default_factory=dict)  # vr_plugin.locate.model_identity of the scored model


def _first_tensor(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    value = kwargs.get("hidden_states")
    return value if isinstance(value, torch.Tensor) else None


def _output_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _config_image_token(model: nn.Module) -> Optional[int]:
    config = unwrap_model(model).config
    for key in ("image_token_id", "image_token_index"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def image_token_mask(model: nn.Module, batch: dict, seq_len: int) -> Optional[torch.Tensor]:
    """Boolean ``[batch, seq]`` mask of image-token positions in the decoder's hidden states, if knowable.

    HF-native models carry one placeholder token per image feature in ``input_ids``; LLaVA/Bunny-style models
    splice image features in place of one placeholder inside ``prepare_inputs_labels_for_multimodal``, which
    :func:`score_layers` observes (see ``_SpliceObserver``).
    """
    ids = batch.get("input_ids")
    token = _config_image_token(model)
    if ids is None or token is None or ids.shape[-1] != seq_len:
        return None
    return ids == token


class _SpliceObserver:
    """Watches LLaVA/Bunny ``prepare_inputs_labels_for_multimodal``, which splices image features into the sequence.

    It is called with probe labels (0 = text) and reports the spliced positions (labels -100 there) and the
    new attention mask, so image tokens are located exactly, never by hard-coded offsets.
    """

    def __init__(self, model: nn.Module):
        self.core = unwrap_model(model)
        self.original = getattr(self.core, "prepare_inputs_labels_for_multimodal", None)
        self.image: Optional[torch.Tensor] = None
        self.attention: Optional[torch.Tensor] = None

    def reset(self) -> None:
        self.image = self.attention = None

    def __enter__(self) -> _SpliceObserver:
        if self.original is None:
            return self
        original = self.original

        def observed(input_ids, position_ids, attention_mask, past_key_values, labels, images, *rest, **kw):
            probe = torch.zeros_like(input_ids) if input_ids is not None else None
            out = original(input_ids, position_ids, attention_mask, past_key_values, probe, images, *rest, **kw)
            new_attention, new_labels = out[2], out[-1]
            if new_labels is not None and new_labels.dim() == 2:
                self.attention = new_attention.bool() if new_attention is not None else None
                real = self.attention if self.attention is not None else torch.ones_like(new_labels, dtype=torch.bool)
                self.image = (new_labels == -100) & real
            return (*out[:-1], None)  # no loss is computed while scoring

        self.core.prepare_inputs_labels_for_multimodal = observed
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.original is not None:
            del self.core.prepare_inputs_labels_for_multimodal


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8).clamp(-1.0, 1.0)


class _Accumulator:
    """Running per-layer sums of a token statistic, separately for each token class.

    The sums (float64) and counts stay tensors on the model's device until :meth:`mean`: reading them back per
    layer (``float(...)``, boolean indexing) would make the host wait for the GPU after every layer, twice per
    token class, and leave the GPU idle while Python launches the next layer.
    """

    def __init__(self) -> None:
        self.sums: dict = {}
        self.counts: dict = {}

    def add(self, key: Any, values: torch.Tensor, mask: torch.Tensor) -> None:
        mask = mask.to(values.device)
        total = torch.where(mask, values.double(), 0.0).sum()
        count = mask.sum()
        if key in self.sums:
            self.sums[key] += total
            self.counts[key] += count
        else:
            self.sums[key], self.counts[key] = total, count

    def mean(self, key: Any) -> float:
        count = int(self.counts[key]) if key in self.counts else 0
        return float(self.sums[key]) / count if count else float("nan")


def reset_position_state(model: nn.Module) -> None:
    """Forget positions a model cached from its previous call (Qwen2-VL's ``rope_deltas`` before transformers
    4.52 are reused by the next call without a cache, which then gets plain 1-D positions for image tokens)."""
    for module in unwrap_model(model).modules():
        if getattr(module, "rope_deltas", None) is not None:
            module.rope_deltas = None


def _batches_to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _weight_change(model: nn.Module, reference: nn.Module, layers_path: Optional[str]) -> dict:
    trained = find_decoder_layers(model, layers_path).layers
    base = find_decoder_layers(reference, layers_path).layers
    if len(trained) != len(base):
        raise ValueError(f"weight_change needs equal depths; got {len(trained)} and {len(base)} layers")
    scores = {}
    for index, (layer, ref) in enumerate(zip(trained, base)):
        ref_linears = {n: m for n, m in ref.named_modules() if isinstance(m, nn.Linear)}
        total = 0.0
        with gathered([*layer.parameters(), *ref.parameters()]):  # ZeRO-3: one layer pair whole at a time
            for name, module in layer.named_modules():
                if isinstance(module, nn.Linear) and name in ref_linears:
                    w, w0 = module.weight.detach().float(), ref_linears[name].weight.detach().float()
                    total += float(torch.linalg.norm(w - w0) / torch.linalg.norm(w0).clamp_min(1e-12))
        scores[index] = total
    return scores


class _BlockDistances:
    """Hooks on every decoder layer: each block's input is held until its output arrives, then their per-token
    distance (Block Influence or angular) is accumulated per token class (all / image / text)."""

    def __init__(self, model: nn.Module, metric: str, n: int, last_token: bool, find_mask: Callable) -> None:
        self.model, self.metric, self.n, self.last_token, self.find_mask = model, metric, n, last_token, find_mask
        self.held: dict = {}  # layer index -> its input, kept only until the block's output arrives
        self.batch: dict = {}
        self.types: Optional[dict] = None  # token class -> mask, fixed when the batch enters the first layer
        self.observer: Any = None
        self.acc = _Accumulator()

    def attach(self, layers: nn.ModuleList) -> list:
        handles = []
        for index, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(self._pre(index), with_kwargs=True))
            handles.append(layer.register_forward_hook(self._post(index), with_kwargs=True))
        return handles

    def start(self, batch: dict, observer: Any) -> None:
        """A new batch: forget the previous one's inputs and token classes."""
        self.batch, self.types, self.observer = batch, None, observer
        self.held.clear()

    def _pre(self, index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = _first_tensor(args, kwargs)
            if hidden is None:
                raise RuntimeError(f"layer {index}: cannot find the hidden states among its inputs")
            if self.types is None:  # the batch's first layer: fix which tokens count
                self.types = _token_masks(
                    self.model, hidden, self.batch, self.observer, self.find_mask, self.metric, self.last_token
                )
            self.held[index] = hidden.detach()

        return hook

    def _post(self, index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            start = index - self.n + 1
            if start < 0:
                return
            values = _cosine(self.held.pop(start), _output_tensor(output))
            values = torch.arccos(values) / math.pi if self.metric == "angular" else 1.0 - values
            for kind, mask in self.types.items():
                self.acc.add((start, kind), values, mask)
            for stale in [k for k in self.held if k <= start]:
                del self.held[stale]

        return hook

    def tokens(self) -> int:
        """Tokens of the current batch that count."""
        return int(self.types["all"].sum()) if self.types else 0

    def scores(self, num_layers: int) -> dict:
        """Reduce: the mean distance per block start, for the metric's token class(es)."""
        starts = range(num_layers - self.n + 1)
        mean = self.acc.mean
        if self.metric in ("bi", "angular"):
            return {i: mean((i, "all")) for i in starts}
        if self.metric in ("bi_image", "bi_text"):
            kind = self.metric[3:]
            return {i: mean((i, kind)) for i in starts}
        return {i: 0.5 * (mean((i, "image")) + mean((i, "text"))) for i in starts}


def _gathering(model: nn.Module, layers: nn.ModuleList) -> tuple:
    """``(hooks, context)`` that make a ``zero.Init``-partitioned model whole for scoring (no engine fetches its
    parameters): each layer's for its own forward, the rest for the whole pass. Nothing for other models."""
    if not zero3_partitioned(model) or zero3_hooked(layers[0]):
        return [], contextlib.nullcontext()
    in_layers = {id(p) for p in layers.parameters()}
    return _gather_per_layer(layers), gathered([p for p in model.parameters() if id(p) not in in_layers])


def _run_batches(model: nn.Module, batches: Iterable[dict], distances: _BlockDistances, handles: list, outside: Any,
                 progress: bool) -> int:  # fmt: skip
    """Forward every batch (no labels, no cache) in eval mode with the hooks on; return the tokens that counted."""
    device = next(unwrap_model(model).parameters()).device
    was_training = model.training
    model.eval()
    seen = 0
    try:
        iterator = batches
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(batches, desc=f"scoring layers ({distances.metric})", unit="batch")
        with outside, _SpliceObserver(model) as observer:
            for batch in iterator:
                batch = _batches_to_device({k: v for k, v in batch.items() if k != "labels"}, device)
                distances.start(batch, observer)
                observer.reset()
                reset_position_state(model)
                model(**batch, use_cache=False)
                seen += distances.tokens()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return seen


@torch.no_grad()
def score_layers(
    model: nn.Module,
    batches: Optional[Iterable[dict]] = None,
    metric: str = "bi",
    *,
    n: int = 1,
    last_token: bool = False,
    reference: Optional[nn.Module] = None,
    image_mask_fn: Optional[Callable[[nn.Module, dict, int], Optional[torch.Tensor]]] = None,
    layers_path: Optional[str] = None,
    progress: bool = True,
    out: Optional[str] = None,
    model_id: str = "",
    data_description: str = "",
) -> dict:
    """Score every decoder layer of ``model`` on ``batches`` (dicts of model inputs); ``{layer: score}``.

    ``metric`` is one of :data:`METRICS`. ``out`` saves a JSON report (metric, scores, model id, data).
    ``image_mask_fn(model, batch, seq_len)`` overrides how image-token positions are found.

    Under DeepSpeed ZeRO-3 every rank calls it with the same batches: a model inside an engine gathers its own
    parameters; one only partitioned by ``zero.Init`` is gathered a decoder layer at a time (the rest for the
    whole pass), and ``weight_change`` gathers one layer pair at a time.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    location = find_decoder_layers(model, layers_path)
    num_layers = len(location.layers)
    if metric == "weight_change":
        if reference is None:
            raise ValueError("metric 'weight_change' needs reference= (the base model the trained one started from)")
        scores = _weight_change(model, reference, layers_path)
        return _finish(ScoreReport(metric, scores, num_layers, model_id, data_description), out, model)
    if batches is None:
        raise ValueError(f"metric {metric!r} needs calibration batches")
    if n < 1 or n > num_layers or (n > 1 and metric != "angular"):
        raise ValueError(f"n={n} is only valid for metric 'angular' with 1 <= n <= {num_layers}")

    distances = _BlockDistances(model, metric, n, last_token, image_mask_fn or image_token_mask)
    gather_hooks, outside = _gathering(model, location.layers)
    seen = _run_batches(model, batches, distances, distances.attach(location.layers) + gather_hooks, outside, progress)
    if seen == 0:
        raise ValueError("score_layers saw no tokens: the calibration batches were empty")
    report = ScoreReport(metric, distances.scores(num_layers), num_layers, model_id, data_description, n=n, tokens=seen)
    report.extra["last_token"] = last_token
    return _finish(report, out, model)


def _gather_per_layer(layers: nn.ModuleList) -> list:
    """Hooks that make each layer's ZeRO-3 partitioned parameters whole for its forward only."""
    open_contexts: dict = {}

    def enter(module: nn.Module, args: tuple) -> None:
        context = gathered(module.parameters())
        context.__enter__()
        open_contexts[id(module)] = context

    def leave(module: nn.Module, args: tuple, output: Any) -> None:
        open_contexts.pop(id(module)).__exit__(None, None, None)

    handles = []
    for layer in layers:
        handles.append(layer.register_forward_pre_hook(enter))
        handles.append(layer.register_forward_hook(leave))
    return handles


def _token_masks(model, hidden, batch, observer, find_mask, metric, last_token) -> dict:
    """Which positions of the batch now entering layer 0 count, split into image / text tokens when needed."""
    shape = tuple(hidden.shape[:2])
    real = None
    if observer.attention is not None and tuple(observer.attention.shape) == shape:
        real = observer.attention
    elif isinstance(batch.get("attention_mask"), torch.Tensor) and tuple(batch["attention_mask"].shape) == shape:
        real = batch["attention_mask"].bool()
    if real is None:
        real = torch.ones(shape, dtype=torch.bool)
    real = real.to(hidden.device)
    if last_token:  # Gromov et al.: each sample's last real token only
        last = torch.zeros_like(real)
        last[torch.arange(shape[0]), real.long().cumsum(-1).argmax(-1)] = True
        real = last
    types = {"all": real}
    if metric in _NEEDS_IMAGE_MASK:
        image = observer.image if observer.image is not None and tuple(observer.image.shape) == shape else None
        if image is None:
            image = find_mask(model, batch, shape[1])
        if image is None:
            raise ValueError(
                f"metric {metric!r} needs image-token positions, which cannot be located for "
                f"{type(unwrap_model(model)).__name__} (no image token id in its config that matches the "
                "sequence); pass image_mask_fn="
            )
        image = image.to(real.device).bool()
        types["image"] = image & real
        types["text"] = ~image & real
    return types


def _finish(report: ScoreReport, out: Optional[str], model: Optional[nn.Module] = None) -> dict:
    if model is not None and not report.identity:
        from .locate import model_identity

        report.identity = model_identity(unwrap_model(model).config)
    if out:
        save_scores(out, report)
    ranked = sorted(report.scores, key=lambda i: report.scores[i])
    logger.info("%s scores, least important first: %s", report.metric, ranked)
    return dict(report.scores)


def save_scores(path: str, report: ScoreReport) -> str:
    """Write a :class:`ScoreReport` as JSON (scores keyed by layer index)."""
    data = {
        "metric": report.metric,
        "scores": {str(k): v for k, v in sorted(report.scores.items())},
        "num_layers": report.num_layers,
        "n": report.n,
        "model": report.model,
        "data": report.data,
        "tokens": report.tokens,
        "identity": report.identity,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **report.extra,
    }
    return write_json(path, data, indent=2)


def load_scores(path: str) -> ScoreReport:
    """Read a JSON written by :func:`save_scores` (or ``score_layers(out=...)``).

    Raises ``FileNotFoundError`` / ``ValueError`` naming the file when it is missing, empty, not JSON or not a
    scores file.
    """
    hint = "write it with vr-plugin score (or vr_plugin.score_layers(out=...))"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"scores file {path!r} does not exist; {hint}")
    with open(path, encoding="utf-8", errors="replace") as handle:
        text = handle.read()
    if not text.strip():
        raise ValueError(f"scores file {path!r} is empty; {hint}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"scores file {path!r} is not JSON ({error}); {hint}") from None
    try:
        scores = {int(k): float(v) for k, v in data["scores"].items()}
        report = ScoreReport(
            data["metric"], scores, int(data["num_layers"]), data.get("model", ""), data.get("data", "")
        )
        report.n = int(data.get("n", 1))
        report.tokens = int(data.get("tokens", 0))
        report.identity = dict(data.get("identity") or {})
    except (KeyError, ValueError, TypeError, AttributeError) as error:
        raise ValueError(f"{path} is not a vr_plugin scores file ({error}); {hint}") from None
    return report
