"""LLaVA-format conversations -> model inputs, through the model's own processor and chat template.

A LLaVA-format file is a JSON list of records::

    {"id": "000017", "image": "000017.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour?"}, {"from": "gpt", "value": "red"}, ...]}

``"from"`` is ``human``/``user``, ``gpt``/``assistant`` or ``system`` (first turn only); after the optional system
turn the conversation alternates human/gpt, starting with a human turn.  ``"image"`` is optional and may be a list
of files; each ``<image>`` marker in a human turn is where one image goes, in order.  A record with an image but no
marker gets its image(s) at the start of the first human turn, where LLaVA puts it.

:class:`ConversationDataset` renders a record with the processor's chat template and encodes it with the processor
itself (images and their placeholder tokens included).  Labels are ``-100`` everywhere but on the assistant turns,
found through the template: an assistant turn's tokens run from the end of the prompt rendered with
``add_generation_prompt=True`` to the end of the conversation rendered through that turn (less trailing
whitespace), so the answer and the end-of-turn token the template writes after it are learnt, and nothing else.
:func:`collate` pads a list of such samples into a batch; :func:`prompt_inputs` encodes a prompt for ``generate``
and :func:`calibration_batches` the human turns of a file for layer scoring.  :func:`validate_conversations` checks
a file and opens every image it names before any model loads; its records can be passed to all of these.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from typing import Any, Iterator, Optional, Sequence, Union

import torch

from .loss import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "Collator",
    "ConversationDataset",
    "as_sample",
    "batch_to_model",
    "calibration_batches",
    "collate",
    "decode_new_tokens",
    "encode_conversation",
    "load_conversations",
    "load_processor",
    "pad_token_id_of",
    "prompt_inputs",
    "record_messages",
    "record_name",
    "to_messages",
    "validate_conversations",
]

logger = logging.getLogger(__name__)

IMAGE_MARKER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# token-level keys of a sample (the sequence is their first dimension) and the value they are padded with (None: the
# pad token id); Mllama's cross_attention_mask is [sequence, image, tile]
TOKEN_KEYS = {
    "input_ids": None,
    "attention_mask": 0,
    "labels": IGNORE_INDEX,
    "mm_token_type_ids": 0,
    "token_type_ids": 0,
    "cross_attention_mask": 0,
}
# Mllama's image-level keys: one row per sample ([1, image, tile, ...]) rather than one per image
PER_SAMPLE_IMAGE_KEYS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")


# ----------------------------------------------------------------------------------------------------- records


def record_name(record: Any, index: Optional[int] = None) -> str:
    """How errors name a record: by its ``id``, else by its index."""
    if isinstance(record, dict) and "id" in record:
        return f"record {record['id']!r}"
    return f"record #{index}" if index is not None else "record without 'id'"


def record_images(record: dict, name: Optional[str] = None) -> list:
    """The image file names of a LLaVA record (``"image"`` may be missing, one name or a list of names)."""
    images = record.get("image")
    if images is None:
        return []
    names = [images] if isinstance(images, str) else images
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(
            f"{name or record_name(record)}: field 'image' must be a file name or a list of them, got {images!r}"
        )
    return list(names)


def _user_content(text: str) -> list:
    """Split a human turn at its ``<image>`` markers into text and image parts (whitespace at a marker dropped)."""
    content = []
    pieces = text.split(IMAGE_MARKER)
    for i, piece in enumerate(pieces):
        if i > 0:
            content.append({"type": "image"})
        piece = piece.strip() if len(pieces) > 1 else piece
        if piece:
            content.append({"type": "text", "text": piece})
    return content


def to_messages(record: dict) -> list:
    """A LLaVA record as chat-template messages ``[{"role", "content": [{"type": "image"}, {"type": "text", ...}]}]``.

    Images go where the ``<image>`` markers were (the markers and the whitespace around them are removed); a record
    with an image but no marker gets it at the start of the first human turn.  Raises ``ValueError`` naming the
    record and the field for anything else that is off.
    """
    return record_messages(record, record_name(record))


def record_messages(record: dict, name: str) -> list:
    if not isinstance(record, dict):
        raise ValueError(f"{name}: expected a JSON object with 'conversations', got {type(record).__name__}")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{name}: field 'conversations' must be a non-empty list of turns, got {turns!r}")
    images = record_images(record, name)
    messages: list = []
    markers = 0
    for t, turn in enumerate(turns):
        where = f"{name}: conversations[{t}]"
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ValueError(f"{where} must be {{'from': ..., 'value': <string>}}, got {turn!r}")
        role = ROLES.get(turn.get("from"))
        if role is None:
            raise ValueError(f"{where}.from is {turn.get('from')!r}; accepted: {', '.join(sorted(ROLES))}")
        if role == "system" and t > 0:
            raise ValueError(f"{where}.from is 'system'; a system turn may only come first")
        expected = "assistant" if messages and messages[-1]["role"] == "user" else "user"
        if role != "system" and role != expected:
            rule = "alternate human/gpt" if any(m["role"] == "user" for m in messages) else "start with a human turn"
            raise ValueError(f"{where}.from is {turn['from']!r}, expected a {expected} turn: conversations must {rule}")
        count = turn["value"].count(IMAGE_MARKER)
        if count and role != "user":
            raise ValueError(f"{where}.value has an {IMAGE_MARKER} marker; images can only go in human turns")
        markers += count
        content = _user_content(turn["value"]) if role == "user" else [{"type": "text", "text": turn["value"]}]
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "user" for m in messages):
        raise ValueError(f"{name}: field 'conversations' has no human turn")
    if markers and markers != len(images):
        raise ValueError(
            f"{name}: the human turns have {markers} {IMAGE_MARKER} marker(s) but field 'image' names "
            f"{len(images)} image(s) ({record.get('image')!r})"
        )
    if images and not markers:  # LLaVA's layout: the image first in the first human turn
        first = next(m for m in messages if m["role"] == "user")
        first["content"] = [{"type": "image"} for _ in images] + first["content"]
    return messages


def _read_jsonl(path: str, handle: Any) -> tuple:
    """The records of a ``.jsonl`` file (blank lines skipped) and the line number of each."""
    records, lines = [], []
    for number, line in enumerate(handle, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number}: not valid JSON ({error.msg} at column {error.colno})") from None
        lines.append(number)
    return records, lines


def _read_records(path: str) -> tuple:
    """``(records, line numbers)`` of a LLaVA-format file: a ``.json`` list (no line numbers) or ``.jsonl``."""
    try:
        with open(path, encoding="utf-8") as handle:
            if path.endswith(".jsonl"):
                return _read_jsonl(path, handle)
            text = handle.read()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    if not text.strip():
        raise ValueError(f"conversation file {path} is empty; expected a JSON list of LLaVA records")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of LLaVA records, got a {type(records).__name__}")
    return records, []


def _check_records(path: str, records: list, lines: list) -> None:
    """Validate every record's structure; ``ValueError`` naming the file (and line of a ``.jsonl``) and record."""
    for index, record in enumerate(records):
        where = f"{path} line {lines[index]}" if lines else path
        record_messages(record, f"{where}: {record_name(record, index)}")


def load_conversations(path: str) -> list:
    """Read a LLaVA-format ``.json`` list (or ``.jsonl``, one record a line) and validate every record.

    Raises ``ValueError`` naming the file (a ``.jsonl``'s line), the record (its ``id``, else its index) and the bad
    field.  Images are not looked at: :func:`validate_conversations` does that too.
    """
    records, lines = _read_records(path)
    _check_records(path, records, lines)
    return records


def _record_label(record: Any, index: int, path: str, lines: list) -> str:
    """How :func:`validate_conversations` names a record: ``record 3 (id 'q17') of train.json``."""
    ident = f" (id {record['id']!r})" if isinstance(record, dict) and "id" in record else ""
    line = f" (line {lines[index]})" if lines else ""
    return f"record {index}{ident} of {path}{line}"


def _unreadable(path: str) -> Optional[str]:
    """Why PIL cannot read the image file ``path`` (``Image.open(...).verify()``), or None when it can."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.verify()
    except UnidentifiedImageError:
        return "cannot identify image file"
    except Exception as error:  # a corrupt file raises anything: SyntaxError, OSError, struct.error, ...
        return str(error) or type(error).__name__
    return None


def _image_error(record: dict, where: str, image_folder: Optional[str], seen: dict) -> Optional[Exception]:
    """The error for the first missing or unreadable image of ``record``, or None; ``seen`` caches checked paths."""
    for name in record_images(record, where):
        path = os.path.join(image_folder or "", name)
        if path not in seen:
            seen[path] = "missing" if not os.path.isfile(path) else _unreadable(path)
        if seen[path] == "missing":
            folder = f"image folder {image_folder!r}" if image_folder else "no image folder given"
            return FileNotFoundError(f"{where}: image {name!r} does not exist ({path!r}; {folder})")
        if seen[path] is not None:
            return ValueError(f"{where}: image {name!r} is not a readable image ({seen[path]})")
    return None


def validate_conversations(path: str, image_folder: Optional[str], skip_bad_images: bool = False) -> tuple[list, int]:
    """Read and check a LLaVA-format file and every image it names, before any model loads.

    Returns ``(records, skipped)``: the records to use (pass them on to :class:`ConversationDataset`,
    :func:`calibration_batches` or :func:`vr_plugin.evaluate.evaluate`) and how many were left out.  Raises
    ``FileNotFoundError`` for a missing file, folder or image and ``ValueError`` for a bad file, record or image, naming
    the record (its 0-based index and ``id``) and the image.  With ``skip_bad_images`` records whose image is missing
    or unreadable are left out instead (counted in ``skipped``); it is still an error if that leaves none.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"conversation file {path!r} does not exist")
    if image_folder is not None and not os.path.isdir(image_folder):
        raise FileNotFoundError(f"image folder {image_folder!r} does not exist")
    records, lines = _read_records(path)
    if not records:
        raise ValueError(f"conversation file {path} holds no records")
    _check_records(path, records, lines)
    kept: list = []
    errors: list = []
    seen: dict = {}
    for index, record in enumerate(records):
        error = _image_error(record, _record_label(record, index, path, lines), image_folder, seen)
        if error is None:
            kept.append(record)
        elif not skip_bad_images:
            raise error
        else:
            if len(errors) < 5:  # a few, so that a wrong image folder does not flood the log
                logger.info("skipping %s", error)
            errors.append(error)
    if not kept:
        raise ValueError(
            f"all {len(records)} records of {path} have a missing or unreadable image, so none is left "
            f"(the first: {errors[0]}); check the image folder"
        )
    return kept, len(errors)


def _load_image(path: str, where: str) -> Any:
    from PIL import Image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: image file {path!r} does not exist")
    with Image.open(path) as image:
        return image.convert("RGB")


def _image_paths(record: dict, image_folder: Optional[str]) -> list:
    return [os.path.join(image_folder or "", name) for name in record_images(record)]


# ----------------------------------------------------------------------------------------------------- processor


def image_only_processor_class(cls: type) -> type:
    """A subclass of the processor class ``cls`` that needs no video processor.

    transformers >= 5 builds Qwen2-VL-family video processors on torchvision only, and their processors cannot be
    made without one.  The subclass keeps ``cls``'s name (so what it saves loads back as ``cls``), and is kept in
    this module's namespace so that it pickles (DataLoader workers).  It keeps ``cls``'s other ``__init__``
    arguments (InternVL's ``image_seq_length``) through ``save_pretrained``, which saves the arguments the
    ``__init__`` signature names, and ``from_pretrained``, which passes on those ``validate_init_kwargs`` accepts.
    """
    qualname = f"_ImageOnly{cls.__name__}"
    if qualname in globals():
        return globals()[qualname]
    signature = inspect.signature(cls.__init__)
    parameters = [p for name, p in signature.parameters.items() if name != "video_processor"]
    own = tuple(p.name for p in parameters[1:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))

    def __init__(self: Any, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kw: Any):
        cls.__init__(self, image_processor, tokenizer, video_processor=None, chat_template=chat_template, **kw)

    __init__.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]

    def validate_init_kwargs(processor_config: dict, valid_kwargs: Sequence[str]) -> tuple:
        return cls.validate_init_kwargs(processor_config=processor_config, valid_kwargs=(*valid_kwargs, *own))

    body = {
        "__init__": __init__,
        "validate_init_kwargs": staticmethod(validate_init_kwargs),
        "__module__": __name__,
        "__qualname__": qualname,
    }
    subclass = type(cls.__name__, (cls,), body)
    globals()[qualname] = subclass
    return subclass


def load_processor(path: str, **kwargs: Any) -> Any:
    """``AutoProcessor.from_pretrained(path)``; where that fails only for want of a video processor (Qwen2-VL family:
    transformers wants torchvision for one, or the directory was saved by a processor made without one), the same
    processor without video support (a warning says so)."""
    import transformers

    try:
        return transformers.AutoProcessor.from_pretrained(path, **kwargs)
    except (ImportError, OSError) as error:
        text = str(error).lower()
        if "torchvision" not in text and "video processor" not in text:
            raise
        config, _ = transformers.ProcessorMixin.get_processor_dict(path, **kwargs)
        cls = getattr(transformers, str(config.get("processor_class")), None)
        if cls is None or "video_processor" not in cls.get_attributes():
            raise
        why = "torchvision is not installed" if "torchvision" in text else "it has no video processor config"
        logger.warning("%s: %s, loading %s without its video processor", path, why, cls.__name__)
        return image_only_processor_class(cls).from_pretrained(path, **kwargs)


def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def _image_token_ids(processor: Any) -> list:
    """The ids of the tokens that stand for an image or a video in the processor's encodings.

    The processor's ``image_token_id`` / ``video_token_id`` and its tokenizer's: they differ where the processor's
    is not the token the model counts (Gemma 3's is ``<start_of_image>``; the model counts the tokenizer's
    ``<image_soft_token>``).  Plus the added tokens among transformers >= 5's ``image_token_ids`` and
    ``video_token_ids``, which also name begin/end-of-image tokens (InternVL's ``<img>``, Aya Vision's
    ``<|START_OF_IMG|>``; Aya Vision's also the text word ``TILE``, left out as it is no added token).
    """
    tokenizer = _tokenizer(processor)
    named = [getattr(o, f"{kind}_token_id", None) for o in (processor, tokenizer) for kind in ("image", "video")]
    listed = [i for kind in ("image", "video") for i in getattr(processor, f"{kind}_token_ids", None) or ()]
    added = getattr(tokenizer, "added_tokens_decoder", {})
    ids = [i for i in named if isinstance(i, int)] + [i for i in listed if isinstance(i, int) and i in added]
    return sorted(set(ids))


def _encode_text(processor: Any, text: str, images: list) -> dict:
    """The processor's encoding of one rendered text (a batch of one, torch tensors)."""
    bos = _tokenizer(processor).bos_token
    add_special_tokens = not (bos and text.startswith(bos))  # as processor.apply_chat_template(tokenize=True) does
    return processor(
        text=[text], images=images or None, return_tensors="pt", add_special_tokens=add_special_tokens
    ).data


def as_sample(encoded: dict) -> dict:
    """A batch of one as one sample: token-level tensors lose their batch dimension, image-level ones keep theirs."""
    return {key: value[0] if key in TOKEN_KEYS else value for key, value in encoded.items()}


def _render(processor: Any, messages: list, add_generation_prompt: bool = False) -> str:
    return processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def _prefix_length(processor: Any, prefix: str, images: list, ids: torch.Tensor, name: str) -> int:
    """How many of ``ids`` (the whole conversation's tokens) encode the rendered ``prefix`` of it."""
    token = getattr(processor, "image_token", None)
    count = prefix.count(token) if token else 0
    prefix_ids = _encode_text(processor, prefix, images[:count])["input_ids"][0]
    n = len(prefix_ids)
    if n > len(ids) or not torch.equal(ids[:n], prefix_ids):
        raise ValueError(
            f"{name}: the chat template's turn boundary {prefix[-30:]!r} does not fall on a token boundary, so the "
            "assistant tokens cannot be told apart"
        )
    return n


def assistant_spans(processor: Any, messages: list, name: str = "sample") -> tuple:
    """The rendered conversation and, per assistant turn, the rendered texts that end right before and after it.

    Raises ``ValueError`` if the chat template renders a turn differently depending on what follows it.
    """
    full = _render(processor, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(processor, messages[:i], add_generation_prompt=True)
        after = _render(processor, messages[: i + 1]).rstrip()
        if not (after.startswith(before) and full.startswith(after)):
            raise ValueError(
                f"{name}: the chat template does not render turn {i} as a prefix of the conversation "
                f"(prompt {before[-40:]!r}, turn {after[-40:]!r}); cannot find the assistant tokens"
            )
        spans.append((before, after))
    return full, spans


def encode_conversation(
    processor: Any, messages: list, images: Sequence = (), max_length: Optional[int] = None, name: str = "sample"
) -> dict:
    """One conversation as the processor's outputs plus ``labels`` (-100 but on the assistant turns).

    Token-level tensors (``input_ids``, ``attention_mask``, ``labels``, ``mm_token_type_ids``) are 1-D (Mllama's
    ``cross_attention_mask`` is [sequence, image, tile]); image-level ones (``pixel_values``, ``image_sizes``,
    ``image_grid_thw``) keep their leading image (or patch) dimension (Mllama's their batch dimension).
    ``max_length`` truncates from the right, but never into the image placeholder tokens: that raises instead.
    """
    images = list(images)
    full, spans = assistant_spans(processor, messages, name)
    sample = as_sample(_encode_text(processor, full, images))
    ids = sample["input_ids"]
    labels = torch.full_like(ids, IGNORE_INDEX)
    for before, after in spans:
        start = _prefix_length(processor, before, images, ids, name)
        end = _prefix_length(processor, after, images, ids, name)
        labels[start:end] = ids[start:end]
    sample["labels"] = labels
    if max_length is not None and len(ids) > max_length:
        placeholders = torch.isin(ids, torch.tensor(_image_token_ids(processor))).nonzero()
        if len(placeholders) and placeholders[-1].item() >= max_length:
            raise ValueError(
                f"{name}: {len(ids)} tokens, and max_length={max_length} would cut into the image placeholder tokens "
                f"(the last is at position {placeholders[-1].item()}); raise max_length or leave the record out"
            )
        sample = {k: v[:max_length] if k in TOKEN_KEYS else v for k, v in sample.items()}
        if spans and (sample["labels"] == IGNORE_INDEX).all():
            raise ValueError(
                f"{name}: {len(ids)} tokens, and max_length={max_length} cuts off every assistant token; "
                "raise max_length or leave the record out"
            )
    return sample


class ConversationDataset(torch.utils.data.Dataset):
    """LLaVA-format records encoded on the fly by ``processor`` (see :func:`encode_conversation`).

    ``records`` is a list of records (e.g. those :func:`validate_conversations` returns: the file is not read
    again; ``source`` then names it in errors) or the path of a LLaVA-format file; image names are relative to
    ``image_folder``.  Every record is validated, and every image file looked for, up front.  With ``cache`` each
    sample is kept in memory after it is first encoded (small data sets trained for several epochs).
    """

    def __init__(
        self,
        records: Union[str, Sequence[dict]],
        image_folder: Optional[str],
        processor: Any,
        max_length: Optional[int] = None,
        cache: bool = False,
        source: Optional[str] = None,
    ):
        self.records = load_conversations(records) if isinstance(records, str) else list(records)
        self.source = source
        self.image_folder = image_folder
        self.processor = processor
        self.max_length = max_length
        self._cache: Optional[dict] = {} if cache else None
        for index, record in enumerate(self.records):
            name = self._name(record, index)
            if not any(m["role"] == "assistant" for m in record_messages(record, name)):
                raise ValueError(f"{name}: field 'conversations' has no gpt turn to learn from")
            for path in _image_paths(record, image_folder):
                if not os.path.isfile(path):
                    raise FileNotFoundError(
                        f"{name}: field 'image' names {path!r}, which does not exist (image_folder={image_folder!r})"
                    )

    def _name(self, record: Any, index: int) -> str:
        """A record as errors name it: by ``id`` (else index), after the file it came from when that is known."""
        return f"{self.source}: {record_name(record, index)}" if self.source else record_name(record, index)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        record = self.records[index]
        name = self._name(record, index)
        images = [_load_image(path, name) for path in _image_paths(record, self.image_folder)]
        sample = encode_conversation(self.processor, record_messages(record, name), images, self.max_length, name)
        if self._cache is not None:
            self._cache[index] = sample
        return sample


# ----------------------------------------------------------------------------------------------------- batches


def _pad_to(tensor: torch.Tensor, shape: Sequence[int], value: Any, left: bool = False) -> torch.Tensor:
    """``tensor`` padded with ``value`` to ``shape``: at the end of every dimension, or of the first on the left."""
    if tuple(tensor.shape) == tuple(shape):
        return tensor
    out = tensor.new_full(tuple(shape), value)
    index = [slice(0, n) for n in tensor.shape]
    if left:
        index[0] = slice(shape[0] - tensor.shape[0], shape[0])
    out[tuple(index)] = tensor
    return out


def _stack_tokens(features: Sequence[dict], key: str, pad: Any, length: int, left: bool) -> torch.Tensor:
    """The token-level ``key`` of every sample padded to ``length`` (and to the largest trailing dimensions), stacked.

    A sample without ``key`` (Mllama's ``cross_attention_mask`` of a text-only sample) gets a row of ``pad``.
    """
    present = [torch.as_tensor(f[key]) for f in features if key in f]
    empty = present[0].new_empty((0, *(0 for _ in present[0].shape[1:])))
    rows = [torch.as_tensor(f[key]) if key in f else empty for f in features]
    rows = [_pad_to(row, (len(f["input_ids"]), *row.shape[1:]), pad) for row, f in zip(rows, features)]
    trailing = [max(row.shape[d] for row in rows) for d in range(1, rows[0].dim())]
    return torch.stack([_pad_to(row, (length, *trailing), pad, left) for row in rows])


def _cat_images(features: Sequence[dict], key: str, per_sample: bool) -> torch.Tensor:
    """The image-level ``key`` of the samples that have it, concatenated along the first dimension (the others
    zero-padded to the largest).  ``per_sample`` (Mllama): every sample has one row, of no images if it has none."""
    parts = [torch.as_tensor(f[key]) for f in features if key in f]
    if per_sample:
        empty = parts[0].new_zeros((1, 0, *parts[0].shape[2:]))
        parts = [torch.as_tensor(f[key]) if key in f else empty for f in features]
    trailing = [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
    return torch.cat([_pad_to(p, (p.shape[0], *trailing), 0) for p in parts])


def collate(features: Sequence[dict], pad_token_id: int, padding_side: str = "right") -> dict:
    """Pad samples of :class:`ConversationDataset` (or :func:`encode_conversation`) into one batch.

    Token-level keys are padded on ``padding_side`` (``right`` for training, ``left`` for batched generation;
    ``input_ids`` with ``pad_token_id``, ``labels`` with -100, the others with 0) and stacked; Mllama's
    ``cross_attention_mask`` ([sequence, image, tile] in a sample) along its sequence and to the most images.
    Image-level keys are concatenated along their first (image or patch) dimension, as Llava (``pixel_values``),
    LLaVA-NeXT (``pixel_values`` with a patch dimension, zero-padded to the most patches, and ``image_sizes``) and
    Qwen2-VL (flattened ``pixel_values`` and ``image_grid_thw``) expect; samples without images just contribute
    none.  Mllama's have one row per sample: zero-padded to the most images (as ``MllamaProcessor`` pads a batch,
    a padding image has its first tile in ``aspect_ratio_mask``), a sample without images gets only padding.
    """
    if not features:
        raise ValueError("collate needs at least one sample")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    length = max(len(f["input_ids"]) for f in features)
    batch = {}
    for key, value in TOKEN_KEYS.items():
        if any(key in f for f in features):
            pad = pad_token_id if value is None else value
            batch[key] = _stack_tokens(features, key, pad, length, padding_side == "left")
    per_sample = "cross_attention_mask" in batch
    for key in dict.fromkeys(k for f in features for k in f if k not in TOKEN_KEYS):
        batch[key] = _cat_images(features, key, per_sample and key in PER_SAMPLE_IMAGE_KEYS)
    if per_sample and "aspect_ratio_mask" in batch:
        batch["aspect_ratio_mask"][:, :, 0] = 1
    return batch


def batch_to_model(batch: dict, model: Any) -> dict:
    """``batch``'s tensors on ``model``'s device, floating ones in ``model``'s dtype (float32 for a quantized one)."""
    parameter = next(model.parameters())
    floating = parameter.dtype if parameter.dtype.is_floating_point else torch.float32
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(parameter.device)
            if value.is_floating_point():
                value = value.to(floating)
        moved[key] = value
    return moved


def pad_token_id_of(processor: Any) -> int:
    tokenizer = _tokenizer(processor)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError(f"{type(tokenizer).__name__} has neither a pad nor an eos token to pad batches with")
    return pad


class Collator:
    """``collate`` with the pad id of ``processor``'s tokenizer, for ``Trainer(data_collator=...)``."""

    def __init__(self, processor: Any):
        self.pad_token_id = pad_token_id_of(processor)

    def __call__(self, features: Sequence[dict]) -> dict:
        return collate(features, self.pad_token_id)


def _prompt_messages(messages: list) -> list:
    """The messages up to and including the last user turn."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    return messages[: last + 1]


def _count_images(messages: list) -> int:
    return sum(part.get("type") == "image" for m in messages for part in m["content"])


def prompt_inputs(
    processor: Any, record_or_question: Union[dict, str], image: Any = None, image_folder: Optional[str] = None
) -> dict:
    """Encode a prompt for ``model.generate``: the conversation up to its last user turn plus the generation prompt.

    ``record_or_question`` is a LLaVA record (its images are read from ``image_folder``) or a question string.
    ``image`` (a PIL image or a path) goes before a question, or replaces a record's (single) image.  Returns a dict
    of batch-of-one tensors.
    """
    if isinstance(image, str):
        image = _load_image(image, "prompt_inputs")
    if isinstance(record_or_question, str):
        content = [{"type": "text", "text": record_or_question}]
        messages = [{"role": "user", "content": ([{"type": "image"}] if image is not None else []) + content}]
        images = [image] if image is not None else []
    else:
        record, name = record_or_question, record_name(record_or_question)
        if image is not None:
            record = {**record, "image": "(the image argument)"}
        messages = _prompt_messages(to_messages(record))
        images = [image] if image is not None else [_load_image(p, name) for p in _image_paths(record, image_folder)]
        images = images[: _count_images(messages)]
    text = _render(processor, messages, add_generation_prompt=True)
    return _encode_text(processor, text, images)


def decode_new_tokens(processor: Any, inputs: dict, output_ids: torch.Tensor) -> list:
    """The text ``generate`` added after the prompt ``inputs``, one string per sample."""
    new = output_ids[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in _tokenizer(processor).batch_decode(new, skip_special_tokens=True)]


def calibration_batches(
    processor: Any,
    json_path: str,
    image_folder: Optional[str],
    batch_size: int = 4,
    limit: Optional[int] = None,
    *,
    records: Optional[Sequence[dict]] = None,
) -> Iterator[dict]:
    """Collated batches (no labels) of each record's human turns with their images, for layer scoring.

    A record's system and human turns are kept (its human turns merged into one user message, a newline apart) and
    rendered with the generation prompt, as at inference.  ``limit`` caps the number of records.  ``records``: the
    already read ones of ``json_path`` (:func:`validate_conversations`'s), so that the file is not read again.
    """
    records = (load_conversations(json_path) if records is None else list(records))[:limit]
    pad_token_id = pad_token_id_of(processor)
    for start in range(0, len(records), batch_size):
        features = []
        for index, record in enumerate(records[start : start + batch_size], start):
            name = record_name(record, index)
            messages = record_messages(record, name)
            system = [m for m in messages if m["role"] == "system"]
            content = []
            for message in (m for m in messages if m["role"] == "user"):
                content += ([{"type": "text", "text": "\n"}] if content else []) + message["content"]
            user = {"role": "user", "content": content}
            images = [_load_image(path, name) for path in _image_paths(record, image_folder)]
            text = _render(processor, system + [user], add_generation_prompt=True)
            features.append(as_sample(_encode_text(processor, text, images)))
        yield collate(features, pad_token_id)
