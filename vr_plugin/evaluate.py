"""Exact-match and option accuracy of an LVLM on LLaVA-format question-answer data: :func:`evaluate`.

Every record's last turn is the reference answer; the prompt is the conversation up to its last human turn (earlier
turns included), rendered by the model's own processor and chat template (:func:`vr_plugin.data.prompt_inputs`).
Answers are generated greedily, in left-padded batches.

Scoring, per record:

* **option accuracy** when the question lists options (``A. red`` / ``(B) blue`` / ``C) green``, one per line or
  inline) and the reference names one of them (by letter or by text): the prediction is right when it names the same
  option, by its letter (``B``, ``B.``, ``(B)``, ``B. blue``) or by the option's text;
* **normalized exact match** otherwise: both strings lower-cased, punctuation and the articles a/an/the dropped,
  number words zero-ten written as digits, whitespace collapsed, then compared.
"""

from __future__ import annotations

import logging
import re
import string
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence, Union

import torch

from .data import (
    as_sample,
    batch_to_model,
    collate,
    decode_new_tokens,
    load_conversations,
    pad_token_id_of,
    prompt_inputs,
    record_messages,
    record_name,
)
from .io import write_json

__all__ = [
    "EvalReport",
    "evaluate",
    "is_correct",
    "normalize_answer",
    "option_letter",
    "parse_options",
    "qa_records",
    "save_predictions",
]

logger = logging.getLogger(__name__)

_ARTICLES = {"a", "an", "the"}
_NUMBERS = {
    w: str(i)
    for i, w in enumerate("zero one two three four five six seven eight nine ten".split())  # VQA's number words
}
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation if c != "'"} | {"'": ""})
_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.)]\s*(\S.*?)\s*$")
_OPTION_INLINE = re.compile(r"(?:^|\s)\(?([A-Z])[.)]\s+(.+?)(?=\s+\(?[A-Z][.)]\s|\s*$)", re.S)
_LETTER = re.compile(r"^(?:(?:the\s+)?(?:answer|option)(?:\s+is)?\s*:?\s*)?\(?([A-Z])\)?(?=$|[\s.):,])", re.I)


@dataclass
class EvalReport:
    """Accuracy over a question-answer file, with every record's prediction."""

    accuracy: float
    correct: int
    total: int
    predictions: list = field(repr=False)
    model: str = ""
    data: str = ""
    seconds: float = 0.0

    def summary(self) -> str:
        """One line: accuracy, counts, where it was measured."""
        options = sum(p["kind"] == "option" for p in self.predictions)
        kinds = f" ({options} multiple-choice)" if options else ""
        return (
            f"accuracy {100 * self.accuracy:.2f}% ({self.correct}/{self.total} records{kinds}) "
            f"of {self.model or 'the model'} on {self.data or 'the data'} in {self.seconds:.1f}s"
        )


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, number words as digits, collapse whitespace."""
    words = str(text).lower().translate(_PUNCTUATION).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


def parse_options(question: str) -> dict:
    """The lettered options listed in ``question`` (``{"A": "red", "B": "blue"}``); ``{}`` when there are none.

    Options are ``A. text``, ``A) text`` or ``(A) text``, one per line or inline, lettered consecutively from A.
    """
    found = {}
    for line in question.splitlines():
        match = _OPTION_LINE.match(line)
        if match:
            found.setdefault(match.group(1), match.group(2))
    if len(found) < 2:
        found = {}
        for match in _OPTION_INLINE.finditer(question):
            found.setdefault(match.group(1), match.group(2).strip())
    letters = sorted(found)
    if len(letters) < 2 or letters != [chr(ord("A") + i) for i in range(len(letters))]:
        return {}
    return found


def option_letter(text: str, options: dict) -> Optional[str]:
    """Which option ``text`` names: by its letter (``B``, ``(B)``, ``B. blue``, ``Answer: B``) or its text."""
    text = text.strip()
    match = _LETTER.match(text)
    if match and match.group(1).upper() in options:
        letter = match.group(1).upper()
        # a lower-case single letter is only a letter when nothing else follows ("a red circle" is no option)
        if match.group(1).isupper() or text.strip("().: ").lower() == letter.lower():
            return letter
    normalized = normalize_answer(text)
    for letter, option in options.items():
        if normalized and normalized == normalize_answer(option):
            return letter
    return None


def is_correct(prediction: str, answer: str, question: str = "") -> tuple:
    """``(correct, kind)``: option accuracy (``kind='option'``) when ``question`` lists options that ``answer``
    names, else normalized exact match (``kind='exact'``)."""
    options = parse_options(question)
    if options:
        reference = option_letter(answer, options)
        if reference is not None:
            return option_letter(prediction, options) == reference, "option"
    return normalize_answer(prediction) == normalize_answer(answer), "exact"


def _text(message: dict) -> str:
    return " ".join(part["text"] for part in message["content"] if part.get("type") == "text").strip()


def qa_records(records: Union[str, Sequence[dict]], *, source: Optional[str] = None) -> list:
    """``(record, question, answer)`` per record; the last turn must be a gpt turn (the reference answer).

    ``records`` is a LLaVA-format file or a list of records (e.g. from :func:`vr_plugin.data.validate_conversations`,
    then ``source`` names their file in errors); raises ``ValueError`` naming a record without answer.
    """
    source = records if isinstance(records, str) else source
    items = load_conversations(records) if isinstance(records, str) else list(records)
    if not items:
        raise ValueError(f"{source or 'the data'} holds no records to evaluate")
    out = []
    for index, record in enumerate(items):
        name = f"{source}: {record_name(record, index)}" if source else record_name(record, index)
        messages = record_messages(record, name)
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"{name}: the last turn must be the gpt answer to score against, got a human turn")
        question = _text(next(m for m in reversed(messages) if m["role"] == "user"))
        out.append((record, question, _text(messages[-1])))
    return out


def _predict(
    model: Any,
    processor: Any,
    items: list,
    image_folder: Optional[str],
    batch_size: int,
    max_new_tokens: int,
    progress: bool,
) -> list:
    """Greedy answers in batches (left-padded), each scored against its record's answer."""
    pad = pad_token_id_of(processor)
    predictions = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc="evaluating", unit="record")
    try:
        for first in range(0, len(items), batch_size):
            chunk = items[first : first + batch_size]
            features = [as_sample(prompt_inputs(processor, r, image_folder=image_folder)) for r, _, _ in chunk]
            batch = batch_to_model(collate(features, pad, padding_side="left"), model)
            output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            for (record, question, answer), prediction in zip(chunk, decode_new_tokens(processor, batch, output)):
                correct, kind = is_correct(prediction, answer, question)
                predictions.append(
                    {
                        "id": record.get("id", first + len(predictions)),
                        "question": question,
                        "answer": answer,
                        "prediction": prediction,
                        "correct": correct,
                        "kind": kind,
                    }
                )
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return predictions


@torch.no_grad()
def evaluate(
    model: Any,
    processor: Any,
    records: Union[str, Sequence[dict]],
    image_folder: Optional[str] = None,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    limit: Optional[int] = None,
    progress: bool = True,
    out: Optional[str] = None,
    model_id: str = "",
    source: Optional[str] = None,
) -> EvalReport:
    """Greedy answers of ``model`` to every record of ``records`` (a LLaVA-format file or list), scored.

    ``out`` writes the report with every record's prediction as JSON. ``source`` names the file a list of
    ``records`` was read from (already validated ones: the file is not read again), for errors and the report's
    ``data``. Returns an :class:`EvalReport`.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    items = qa_records(records, source=source)[:limit]
    if not items:
        raise ValueError(f"limit={limit} leaves no record to evaluate")
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        predictions = _predict(model, processor, items, image_folder, batch_size, max_new_tokens, progress)
    finally:
        model.train(was_training)
    correct = sum(p["correct"] for p in predictions)
    report = EvalReport(
        accuracy=correct / len(predictions),
        correct=correct,
        total=len(predictions),
        predictions=predictions,
        model=model_id,
        data=records if isinstance(records, str) else source or "",
        seconds=time.perf_counter() - start,
    )
    if out:
        save_predictions(out, report)
    return report


def save_predictions(path: str, report: EvalReport) -> str:
    """Write an :class:`EvalReport` (accuracy and every record's prediction) as JSON, atomically."""
    return write_json(path, asdict(report), indent=1)
