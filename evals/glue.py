"""GLUE probes of an (edited) model: SST-2, MRPC, CoLA, RTE with few-shot prompts.

(Over 500 lines because of the data: about 130 of them are the four tasks'
prompts and hand-written demonstrations.)

Each prompt is a fixed instruction, four hand-written demonstrations (not GLUE
rows; labels alternate, label 1 first, which kept SmolLM2's label bias lowest)
and the example. Two ways to read the model's answer:

- ``"logprob"`` (default): the log-probability of each label word after the
  prompt; the prediction is the argmax. The shared instruction and demos are
  run once per task and their KV cache reused, the examples are batched and
  the output head is applied only where a label token is read.
- ``"generate"``: greedy generation of 3 tokens and a case-insensitive
  substring match of the label words (the published r-ROME protocol); an
  answer that matches no label or more than one is counted invalid (and wrong).

Both read the same token ids: the prefix and the example are tokenized apart
and concatenated.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from rome.batching import pad_id_of, pad_right, prompt_ids
from rome.devices import model_device
from rome.progress import Progress
from rome.scoring import trunk_and_head

from ._hf import cache_kwargs, output_cache
from .errors import DataUnavailableError, EvalDataError
from .metrics import generate_ids

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).parent / "data" / "glue"
TASKS = ("sst2", "mrpc", "cola", "rte")
HUB_DATASET = "nyu-mll/glue"
HUB_PER_CLASS, HUB_SEED = 100, 37
SCORINGS = ("logprob", "generate")
CALIBRATIONS = ("none", "contextual")
# Zhao et al. 2021 ("Calibrate Before Use"): content-free inputs in place of every field
CONTENT_FREE = ("N/A", "", "[MASK]")
GEN_TOKENS = 3


@dataclass(frozen=True)
class GlueExample:
    """One labelled example; ``text`` maps the task's fields to strings."""

    idx: int
    label: int
    text: dict[str, str]


@dataclass(frozen=True)
class GlueTask:
    """A task's prompt format, label words and demonstrations."""

    name: str
    fields: tuple[str, ...]
    instruction: str
    template: str  # the example, up to where the label word goes
    label_words: dict[int, str]  # label -> word, with its leading space
    demos: tuple[tuple[dict[str, str], int], ...]

    def query(self, text: dict[str, str]) -> str:
        return self.template.format(**{k: text[k].strip() for k in self.fields})

    def prefix(self) -> str:
        """The instruction and the demonstrations, ending with a blank line."""
        shots = "".join(f"{self.query(t)}{self.label_words[y]}\n\n" for t, y in self.demos)
        return f"{self.instruction}\n\n{shots}"

    @property
    def labels(self) -> list[int]:
        return sorted(self.label_words)


YES_NO = {1: " yes", 0: " no"}

GLUE_TASKS: dict[str, GlueTask] = {
    "sst2": GlueTask(
        "sst2",
        ("sentence",),
        "Classify the sentiment of each movie review as positive or negative.",
        "Review: {sentence}\nSentiment:",
        {1: " positive", 0: " negative"},
        (
            ({"sentence": "a warm , funny and beautifully acted little film ."}, 1),
            ({"sentence": "the plot is thin and every joke lands with a thud ."}, 0),
            ({"sentence": "an absorbing portrait , told with real care and wit ."}, 1),
            ({"sentence": "two hours of noise that never adds up to a story ."}, 0),
        ),
    ),
    "mrpc": GlueTask(
        "mrpc",
        ("sentence1", "sentence2"),
        "Decide whether the two sentences mean the same thing. Answer yes or no.",
        "Sentence 1: {sentence1}\nSentence 2: {sentence2}\nDo they mean the same thing? Answer:",
        YES_NO,
        (
            (
                {
                    "sentence1": "The firm said its profit rose 10 percent in the third quarter .",
                    "sentence2": "Third-quarter profit climbed 10 percent , the firm said .",
                },
                1,
            ),
            (
                {
                    "sentence1": "The mayor will visit the flooded towns on Monday .",
                    "sentence2": "The flooded towns received new state funds last week .",
                },
                0,
            ),
            (
                {
                    "sentence1": "Police arrested two men after the robbery on Friday night .",
                    "sentence2": "Two men were arrested by police after Friday night 's robbery .",
                },
                1,
            ),
            (
                {
                    "sentence1": "Shares of the airline fell 3 percent in early trading .",
                    "sentence2": "The airline plans to add 40 new routes next year .",
                },
                0,
            ),
        ),
    ),
    "cola": GlueTask(
        "cola",
        ("sentence",),
        "Decide whether each sentence is grammatically acceptable English. Answer yes or no.",
        "Sentence: {sentence}\nIs it grammatical? Answer:",
        YES_NO,
        (
            ({"sentence": "The children played in the garden all afternoon."}, 1),
            ({"sentence": "Tom put the vase."}, 0),
            ({"sentence": "Which book did you say that Anna had bought?"}, 1),
            ({"sentence": "She seems sleeping soundly."}, 0),
        ),
    ),
    "rte": GlueTask(
        "rte",
        ("sentence1", "sentence2"),
        "Decide whether the premise entails the hypothesis. Answer yes or no.",
        "Premise: {sentence1}\nHypothesis: {sentence2}\nDoes the premise entail the hypothesis? "
        "Answer:",
        {0: " yes", 1: " no"},  # RTE: label 0 is entailment
        (
            (
                {
                    "sentence1": "Maria moved to Lisbon in 2010 to study architecture.",
                    "sentence2": "Maria was born in Lisbon.",
                },
                1,
            ),
            (
                {
                    "sentence1": "The museum, which opened in 1995, shows more than 3,000 "
                    "paintings by local artists.",
                    "sentence2": "The museum shows paintings.",
                },
                0,
            ),
            (
                {
                    "sentence1": "The new bridge will be paid for by a toll on drivers.",
                    "sentence2": "The bridge was built at no cost to drivers.",
                },
                1,
            ),
            (
                {
                    "sentence1": "Heavy rain made the river flood several villages in the north.",
                    "sentence2": "Villages were flooded.",
                },
                0,
            ),
        ),
    ),
}


@dataclass
class GlueResult:
    """Scores of one task; invalid answers count as wrong everywhere."""

    task: str
    accuracy: float
    f1: float  # of label 1 (the MRPC metric)
    mcc: float  # Matthews correlation (the CoLA metric)
    invalid: int
    n: int
    scoring: str = "logprob"
    predictions: list[int] = field(default_factory=list)  # -1: invalid
    gold: list[int] = field(default_factory=list)  # the examples' labels, in the same order
    ids: list[int] = field(default_factory=list)  # the examples' ``idx`` in the task file

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def per_example(self) -> dict[str, list[int]]:
        """What a checkpoint stores to pair two runs on the same examples (its ``extra``):
        each example's file ``idx``, gold label and prediction (-1: invalid)."""
        return {"idx": list(self.ids), "gold": list(self.gold), "pred": list(self.predictions)}


def correct_by_example(extra: Mapping[str, Any] | None) -> dict[int, bool] | None:
    """``idx -> correct`` from a stored checkpoint's ``extra`` (None where the checkpoint
    was stored without per-example predictions, as before 2026-12-07)."""
    x = extra or {}
    idx, gold, pred = x.get("idx"), x.get("gold"), x.get("pred")
    if not (isinstance(idx, list) and isinstance(gold, list) and isinstance(pred, list)):
        return None
    return {int(i): int(g) == int(p) for i, g, p in zip(idx, gold, pred, strict=True)}


# --- data ---------------------------------------------------------------------


def task_of(name: str) -> GlueTask:
    """The task for ``"sst2"``, ``"SST-2"``, ``"rte"``..."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in GLUE_TASKS:
        raise EvalDataError(f"unknown GLUE task {name!r}; known: {', '.join(TASKS)}")
    return GLUE_TASKS[key]


def balanced_head(examples: Sequence[GlueExample], limit: int | None) -> list[GlueExample]:
    """The first examples in file order with as many of each label as possible."""
    if limit is None or limit >= len(examples):
        return list(examples)
    labels = sorted({e.label for e in examples})
    quota = {y: limit // len(labels) + (i < limit % len(labels)) for i, y in enumerate(labels)}
    keep = []
    for i, e in enumerate(examples):
        if quota[e.label] > 0:
            quota[e.label] -= 1
            keep.append(i)
    if len(keep) < limit:  # a label ran short: fill from the rest, in file order
        rest = [i for i in range(len(examples)) if i not in set(keep)]
        keep = sorted(keep + rest[: limit - len(keep)])
    return [examples[i] for i in keep]


def _example(task: GlueTask, row: dict[str, Any], where: str) -> GlueExample:
    try:
        text = {k: str(row[k]) for k in task.fields}
        label = int(row["label"])
    except (KeyError, TypeError, ValueError) as err:
        raise EvalDataError(f"{where}: bad {task.name} row ({err!r})") from err
    if label not in task.label_words:
        raise EvalDataError(f"{where}: label {label} is not one of {task.labels}")
    return GlueExample(int(row.get("idx", -1)), label, text)


def _hub_rows(task: GlueTask) -> list[dict[str, Any]]:
    try:
        import datasets

        ds = datasets.load_dataset(HUB_DATASET, task.name, split="validation")
    except Exception as err:  # any failure (offline, hub down): say so clearly
        raise DataUnavailableError(
            f"could not download GLUE {task.name} from {HUB_DATASET} (offline?): {err}. "
            "Use the bundled subsets (source=None)."
        ) from err
    rng = random.Random(HUB_SEED)
    rows: list[dict[str, Any]] = []
    for y in task.labels:
        of_y = [dict(r) for r in ds if int(r["label"]) == y]
        rows += rng.sample(of_y, min(HUB_PER_CLASS, len(of_y)))
    rng.shuffle(rows)
    return rows


def load_glue(
    task: str, source: str | Path | None = None, limit: int | None = None
) -> list[GlueExample]:
    """Examples of ``task`` from the bundled subsets, a JSON-lines dir, or ``"hub"``.

    ``limit`` keeps a label-balanced head of the file (see :func:`balanced_head`).
    """
    spec = task_of(task)
    if source == "hub":
        rows, where = _hub_rows(spec), HUB_DATASET
    else:
        path = Path(source or DATA_DIR) / f"{spec.name}.jsonl"
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
            rows = [json.loads(line) for line in lines if line.strip()]
        except (OSError, json.JSONDecodeError) as err:
            raise EvalDataError(f"cannot read GLUE file {path}: {err}") from err
        where = str(path)
    return balanced_head([_example(spec, r, where) for r in rows], limit)


# --- scoring ------------------------------------------------------------------


def encode(tok: PreTrainedTokenizerBase, task: GlueTask, ex: GlueExample) -> list[int]:
    """The example's own token ids (the prefix is tokenized apart)."""
    return list(tok(task.query(ex.text), add_special_tokens=False)["input_ids"])


def _label_ids(tok: PreTrainedTokenizerBase, task: GlueTask) -> list[list[int]]:
    return [
        list(tok(task.label_words[y], add_special_tokens=False)["input_ids"]) for y in task.labels
    ]


def _after_prefix(
    trunk: nn.Module, pre_cache: Any, prefix_len: int, seqs: list[list[int]], pad_id: int
) -> torch.Tensor:
    """Final hidden states of right-padded ``seqs``, each continuing the cached prefix."""
    device = model_device(trunk)
    ids, mask = pad_right(seqs, pad_id, device)
    n, width = ids.shape
    cache = copy.deepcopy(pre_cache)
    cache.batch_repeat_interleave(n)
    positions = torch.arange(prefix_len, prefix_len + width, device=device)
    return trunk(
        input_ids=ids,
        attention_mask=torch.cat([mask.new_ones(n, prefix_len), mask], dim=1),
        position_ids=positions.expand(n, -1),
        use_cache=True,
        **cache_kwargs(trunk, cache),
    ).last_hidden_state


@torch.no_grad()
def label_logprobs(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    task: GlueTask,
    examples: Sequence[GlueExample],
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> list[list[float]]:
    """Log p(label word | prefix + example) for each example and each of ``task.labels``."""
    device = model_device(model)
    trunk, head = trunk_and_head(model)
    prefix = prompt_ids(tok, task.prefix())
    labels = _label_ids(tok, task)
    single = all(len(ids) == 1 for ids in labels)
    pre_cache = output_cache(trunk(input_ids=torch.tensor([prefix], device=device), use_cache=True))
    rows = [encode(tok, task, e) for e in examples]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # batches of similar length
    result: list[list[float]] = [[] for _ in rows]
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        # one sequence per example when every label is one token, else one per (example, label)
        seqs = (
            [rows[i] for i in batch]
            if single
            else [rows[i] + ids[:-1] for i in batch for ids in labels]
        )
        hidden = _after_prefix(trunk, pre_cache, len(prefix), seqs, pad_id_of(tok))
        where, want = [], []  # (sequence, position) read, and the token wanted there
        for b, i in enumerate(batch):
            for j, lab in enumerate(labels):
                s = b if single else b * len(labels) + j
                where += [(s, len(rows[i]) - 1 + k) for k in range(len(lab))]
                want += lab
        sel = torch.tensor(where, device=device)
        logp = head(hidden[sel[:, 0], sel[:, 1]]).float().log_softmax(-1)
        picked = logp.gather(1, torch.tensor(want, device=device)[:, None])[:, 0].tolist()
        k = 0
        for i in batch:
            for lab in labels:
                result[i].append(sum(picked[k : k + len(lab)]))
                k += len(lab)
        if progress is not None:
            progress(min(start + batch_size, len(order)))
    return result


def match_label(answer: str, label_words: dict[int, str]) -> int:
    """The label whose word occurs in ``answer`` (case-insensitive); -1 for none or several."""
    text = answer.lower()
    hits = [y for y, w in label_words.items() if w.strip().lower() in text]
    return hits[0] if len(hits) == 1 else -1


def generated_answers(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    task: GlueTask,
    examples: Sequence[GlueExample],
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy continuations (``GEN_TOKENS`` tokens) of the full prompts."""
    prefix = prompt_ids(tok, task.prefix())
    seqs = [prefix + encode(tok, task, e) for e in examples]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # less padding
    out = [""] * len(seqs)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        new = generate_ids(
            model,
            [seqs[i] for i in idx],
            GEN_TOKENS,
            eos_id=tok.eos_token_id,
            pad_id=pad_id_of(tok),
            greedy=True,
        )
        for i, t in zip(idx, new, strict=True):
            out[i] = str(tok.decode(t, skip_special_tokens=True))
        if progress is not None:
            progress(min(start + batch_size, len(order)))
    return out


def content_free_logprior(
    model: nn.Module, tok: PreTrainedTokenizerBase, task: GlueTask
) -> list[float]:
    """log of the mean label distribution (over the labels) on content-free inputs."""
    frees = [GlueExample(-1, 0, {f: word for f in task.fields}) for word in CONTENT_FREE]
    rows = label_logprobs(model, tok, task, frees)
    probs = torch.tensor(rows, dtype=torch.float64).softmax(-1).mean(0)
    return probs.log().tolist()


def predict(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    task: GlueTask,
    examples: Sequence[GlueExample],
    scoring: str = "logprob",
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
    calibration: str = "none",
) -> list[int]:
    """Predicted labels (-1: an invalid generated answer).

    ``calibration="contextual"`` (log-prob scoring only) divides each label's
    probability by the one the same few-shot prompt gives it on content-free
    inputs, so a model that prefers one label word whatever the input can
    still rank the inputs.
    """
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {CALIBRATIONS}, not {calibration!r}")
    if scoring == "logprob":
        scores = label_logprobs(model, tok, task, examples, batch_size, progress)
        if calibration == "contextual":
            prior = content_free_logprior(model, tok, task)
            scores = [[x - p for x, p in zip(row, prior, strict=True)] for row in scores]
        return [task.labels[max(range(len(s)), key=s.__getitem__)] for s in scores]
    if calibration != "none":
        raise ValueError("contextual calibration needs log-prob scoring")
    if scoring == "generate":
        answers = generated_answers(model, tok, task, examples, batch_size, progress)
        return [match_label(a, task.label_words) for a in answers]
    raise ValueError(f"scoring must be one of {SCORINGS}, not {scoring!r}")


def f1_score(gold: Sequence[int], pred: Sequence[int], positive: int = 1) -> float:
    """F1 of the ``positive`` label."""
    tp = sum(g == positive and p == positive for g, p in zip(gold, pred, strict=True))
    fp = sum(g != positive and p == positive for g, p in zip(gold, pred, strict=True))
    fn = sum(g == positive and p != positive for g, p in zip(gold, pred, strict=True))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def mcc_score(gold: Sequence[int], pred: Sequence[int]) -> float:
    """Matthews correlation of binary 0/1 labels (0 when undefined)."""
    pairs = list(zip(gold, pred, strict=True))
    tp, tn = pairs.count((1, 1)), pairs.count((0, 0))
    fp, fn = pairs.count((0, 1)), pairs.count((1, 0))
    den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / den if den else 0.0


def glue_result(
    task: str, gold: Sequence[int], pred: Sequence[int], scoring: str = "logprob"
) -> GlueResult:
    """Accuracy, F1 and MCC; an invalid prediction (-1) counts as the wrong label."""
    scored = [p if p >= 0 else 1 - g for g, p in zip(gold, pred, strict=True)]
    n = len(gold)
    return GlueResult(
        task=task,
        accuracy=sum(g == p for g, p in zip(gold, pred, strict=True)) / n if n else 0.0,
        f1=f1_score(gold, scored),
        mcc=mcc_score(gold, scored),
        invalid=sum(p < 0 for p in pred),
        n=n,
        scoring=scoring,
        predictions=list(pred),
        gold=list(gold),
    )


def _per_task(progress: Progress, task: str, total: int) -> Callable[[int], None]:
    return lambda done: progress(task, done, total)


def evaluate_glue(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    tasks: Sequence[str] = TASKS,
    limit: int | None = None,
    scoring: str = "logprob",
    batch_size: int = 16,
    progress: Progress | None = None,
    source: str | Path | None = None,
    calibration: str = "none",
) -> dict[str, GlueResult]:
    """Score ``model`` on each task (``limit`` examples, label-balanced)."""
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, not {scoring!r}")
    results: dict[str, GlueResult] = {}
    for name in tasks:
        task = task_of(name)
        examples = load_glue(task.name, source, limit)
        report = None if progress is None else _per_task(progress, task.name, len(examples))
        pred = predict(model, tok, task, examples, scoring, batch_size, report, calibration)
        result = glue_result(task.name, [e.label for e in examples], pred, scoring)
        result.ids = [e.idx for e in examples]
        results[task.name] = result
        log.info("GLUE %s (%s): accuracy %.3f", task.name, scoring, results[task.name].accuracy)
    return results
