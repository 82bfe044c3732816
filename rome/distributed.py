"""Covariance statistics on many processes with torch.distributed.

The second moment is a sum over texts, so it shards cleanly: each rank takes
every ``world_size``-th text of the corpus (after the first ``n_texts`` are
chosen, so the texts are exactly those of a single-process run), sums k kᵀ
for its share with :func:`rome.covariance.collect_moment_sum`, and the float64
sums and the token and text counts are all-reduced. Rank 0 checks and writes
the cache file, with metadata naming the world size and each rank's share.
The result equals a single-process run to float error (only the order of the
additions differs).

Launch with ``torchrun`` (NCCL on GPUs, one GPU per rank; gloo on CPUs)::

    torchrun --nproc-per-node 8 -m workbench.cli stats --model gpt-j-6b --corpus wikipedia
    torchrun --nproc-per-node 2 -m rome.distributed --model tiny-gpt2 --corpus DIR

Before anything is collected the ranks all-gather a small descriptor (model,
layer, module, input width, corpus, counts, precision and a hash of the
edited weight) and every rank refuses to go on if any rank differs
(:class:`~rome.errors.DistributedMismatchError`). Sampled corpora (text
sampled from the model) are sampled once, on rank 0, and broadcast.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import covariance as cov
from .errors import BadRequestError, DistributedMismatchError, RomeError
from .hparams import EditHparams
from .models import LoadedModel, load_model
from .paths import cache_dir, slug
from .progress import StepProgress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the group (world size 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


@dataclass
class StatsOutcome:
    """What :func:`run_stats` did: the statistics, where they are, and whether it collected."""

    stats: cov.SecondMoment
    path: Path | None
    cached: bool
    world_size: int


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or with its environment) for >1 rank."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
    except ValueError:
        return False


def rank_device(backend: str, local_rank: int) -> str:
    """NCCL: one GPU per rank (``cuda:LOCAL_RANK``); gloo: the CPU."""
    return f"cuda:{local_rank}" if backend == "nccl" else "cpu"


def init(backend: str | None = None, device: str = "auto") -> DistInfo:
    """Join the process group torchrun set up (``env://``); NCCL on GPUs, gloo on CPUs.

    Without a torchrun environment (world size 1) nothing is initialised.
    """
    if not launched():
        return DistInfo()
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and device != "cpu" else "gloo"
    if backend not in ("nccl", "gloo"):
        raise BadRequestError(f"unknown backend {backend!r}: use nccl (GPUs) or gloo (CPUs)")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise BadRequestError("the nccl backend needs GPUs and none is visible; use gloo")
        if local_rank >= torch.cuda.device_count():
            raise BadRequestError(
                f"rank {rank} (local rank {local_rank}) has no GPU: only "
                f"{torch.cuda.device_count()} visible; use --nproc-per-node "
                f"{torch.cuda.device_count()} or fewer"
            )
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    log.info("rank %d of %d joined (%s)", rank, world, backend)
    return DistInfo(rank, world, local_rank, backend)


def shutdown(info: DistInfo) -> None:
    if info.active and dist.is_initialized():
        dist.destroy_process_group()


def shard(texts: Iterable[str], rank: int, world_size: int) -> Iterator[str]:
    """Every ``world_size``-th text, starting at ``rank`` (round robin: shares differ by ≤ 1)."""
    return itertools.islice(texts, rank, None, world_size)


def weight_digest(lm: LoadedModel, module: str) -> str:
    """A short hash of the edited weight (ranks with different weights must not mix)."""
    w = lm.model.get_submodule(module).weight
    assert isinstance(w, torch.Tensor)
    data = w.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()[:16]


def descriptor(
    lm: LoadedModel,
    hp: EditHparams,
    corpus: str,
    forward: str,
    accumulate: str,
    batch_tokens: int,
) -> dict[str, Any]:
    """What every rank must agree on before collecting."""
    module = hp.weight_module(hp.layer)
    return {
        "model": hp.name,
        "layer": hp.layer,
        "module": module,
        "width": cov.expected_width(lm.model, module),
        "corpus": corpus,
        "n_texts": hp.mom2_n_samples,
        "max_len": hp.mom2_max_len,
        "dtype": hp.mom2_dtype,
        "seed": hp.template_seed,
        "forward": forward,
        "accumulate": accumulate,
        "batch_tokens": batch_tokens,
        "weight": weight_digest(lm, module),
    }


def check_agreement(desc: dict[str, Any], info: DistInfo) -> None:
    """All-gather the descriptors; every rank raises the same error if any rank differs."""
    if not info.active:
        return
    gathered: list[dict[str, Any] | None] = [None] * info.world_size
    dist.all_gather_object(gathered, desc)
    ref = gathered[0]
    assert ref is not None
    diffs = []
    for rank, other in enumerate(gathered[1:], start=1):
        assert other is not None
        for key in ref:
            if other.get(key) != ref.get(key):
                diffs.append(f"rank {rank} has {key}={other.get(key)!r}, rank 0 {ref.get(key)!r}")
    if diffs:
        shown = "; ".join(diffs[:4]) + (f" (and {len(diffs) - 4} more)" if len(diffs) > 4 else "")
        raise DistributedMismatchError(
            f"the ranks disagree, nothing was collected: {shown}; launch every rank with the "
            "same model, layer and corpus"
        )


def _broadcast_decision(value: bool, info: DistInfo) -> bool:
    if not info.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def _corpus_for_rank(
    lm: LoadedModel,
    hp: EditHparams,
    corpus: str,
    text_cache: Path | None,
    info: DistInfo,
) -> Iterator[str]:
    """This rank's share of the first ``n_texts`` texts of the corpus."""
    n = hp.mom2_n_samples
    texts: Iterable[str]
    if corpus == "sampled" and info.active:
        # sampled once on rank 0 and broadcast, so every rank shards the same texts
        box: list[Any] = [None]
        if info.is_main:
            box[0] = list(
                cov.corpus_texts(
                    corpus, lm.model, lm.tokenizer, n, hp.mom2_max_len, hp.template_seed, text_cache
                )
            )
        dist.broadcast_object_list(box, src=0)
        texts = box[0]
    else:
        texts = cov.corpus_texts(
            corpus, lm.model, lm.tokenizer, n, hp.mom2_max_len, hp.template_seed, text_cache
        )
    return shard(texts, info.rank, info.world_size)


def _all_reduce(ms: cov.MomentSum, info: DistInfo) -> tuple[cov.MomentSum, list[list[int]]]:
    """Sum the per-rank sums and counts; also gather each rank's (tokens, texts)."""
    if not info.active:
        return ms, [[ms.n_tokens, ms.n_texts]]
    dev = ms.total.device if info.backend == "nccl" else torch.device("cpu")
    total = ms.total.to(dev)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    counts = torch.tensor([ms.n_tokens, ms.n_texts], dtype=torch.int64, device=dev)
    per_rank = [torch.zeros_like(counts) for _ in range(info.world_size)]
    dist.all_gather(per_rank, counts)
    shares = [[int(x) for x in c.tolist()] for c in per_rank]
    n_tokens = sum(s[0] for s in shares)
    n_texts = sum(s[1] for s in shares)
    return cov.MomentSum(total, n_tokens, n_texts), shares


def run_stats(
    lm: LoadedModel,
    *,
    corpus: str | None = None,
    n_texts: int | None = None,
    force: bool = False,
    progress: StepProgress | None = None,
    batch_tokens: int = 4096,
    forward: str = "float32",
    accumulate: str = "float64",
    info: DistInfo | None = None,
    cache: Path | None = None,
    path: Path | None = None,
) -> StatsOutcome:
    """The covariance statistics of ``lm``'s edited layer, from the cache or collected.

    On one process this is the plain collector; under torchrun (``info`` from
    :func:`init`) the corpus is sharded and the sums all-reduced, and only rank
    0 writes. ``force`` collects again even when the cache has the file (and
    replaces it only once the new matrix has passed its checks). ``path`` is the
    cache file (default: where :meth:`rome.Editor.stats_file` puts it). Every
    rank returns the same statistics.
    """
    info = info or DistInfo()
    hp = lm.hparams.replace(mom2_n_samples=n_texts) if n_texts else lm.hparams
    corpus = corpus or hp.mom2_dataset
    module = hp.weight_module(hp.layer)
    width = cov.expected_width(lm.model, module)
    root = cache if cache is not None else cache_dir()
    if path is None:
        path = cov.stats_path(
            root, slug(hp.model), corpus, module, hp.mom2_dtype, hp.mom2_n_samples
        )
    check_agreement(descriptor(lm, hp, corpus, forward, accumulate, batch_tokens), info)
    if _broadcast_decision(path.is_file() and not force, info):
        return StatsOutcome(cov.load_stats(path, width), path, True, info.world_size)
    stats = _collect(lm, hp, corpus, root, info, progress, batch_tokens, forward, accumulate)
    if info.is_main:
        cov.save_stats(path, stats, width)
        n_tokens = stats.meta.n_tokens
        log.info("rank 0 wrote %s (%d tokens, %d ranks)", path, n_tokens, info.world_size)
    if info.active:
        dist.barrier()
    return StatsOutcome(stats, path, False, info.world_size)


def _collect(
    lm: LoadedModel,
    hp: EditHparams,
    corpus: str,
    root: Path,
    info: DistInfo,
    progress: StepProgress | None,
    batch_tokens: int,
    forward: str,
    accumulate: str,
) -> cov.SecondMoment:
    """This rank's share of the corpus collected, every rank's sums added, and the
    statistics' metadata (with the world size and, on several ranks, each rank's share)."""
    model_key = slug(hp.model)
    module = hp.weight_module(hp.layer)
    t0 = time.perf_counter()
    texts = _corpus_for_rank(lm, hp, corpus, root / "stats" / model_key, info)
    share = math.ceil(hp.mom2_n_samples / info.world_size)
    ms = cov.collect_moment_sum(
        lm.model,
        lm.tokenizer,
        module,
        texts,
        share,
        hp.mom2_max_len,
        batch_tokens,
        progress=progress if info.is_main else None,
        forward=forward,
        accumulate=accumulate,
    )
    ms, shares = _all_reduce(ms, info)
    meta = cov.stats_meta(
        model_key,
        hp.layer,
        module,
        corpus,
        ms,
        hp.mom2_max_len,
        hp.mom2_dtype,
        hp.template_seed,
        time.perf_counter() - t0,
    )
    meta.extra.update(
        world_size=info.world_size,
        backend=info.backend,
        batch_tokens=batch_tokens,
        forward=forward,
        accumulate=accumulate,
    )
    if info.active:
        meta.extra["per_rank"] = [{"n_tokens": t, "n_texts": n} for t, n in shares]
    return cov.SecondMoment(ms.mean(), meta)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="torchrun --nproc-per-node N -m rome.distributed",
        description="Collect and cache the covariance statistics of the edited layer on N "
        "processes (NCCL on GPUs, gloo on CPUs). Also runs as one plain process.",
    )
    p.add_argument("--model", "-m", default="smollm2-135m")
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--hparams", default=None)
    p.add_argument("--corpus", default=None, help="wikipedia, wikitext, sampled or a folder")
    p.add_argument("--n-texts", type=int, default=None)
    p.add_argument("--device", default="auto", help="with torchrun: cuda (one GPU per rank) or cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--precision", default="float32", choices=cov.FORWARD_PRECISIONS)
    p.add_argument("--accumulate", default="float64", choices=tuple(cov.ACCUMULATE_DTYPES))
    p.add_argument("--backend", default=None, choices=("nccl", "gloo"))
    p.add_argument("--force", action="store_true", help="collect again even if cached")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m rome.distributed``; returns the exit code (2 bad input)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    info = DistInfo()
    try:
        info = init(args.backend, args.device)
        device = rank_device(info.backend, info.local_rank) if info.active else args.device
        lm = load_model(
            args.model, device=device, dtype=args.dtype, hparams=args.hparams, layer=args.layer
        )
        outcome = run_stats(
            lm,
            corpus=args.corpus,
            n_texts=args.n_texts,
            force=args.force,
            batch_tokens=args.batch_tokens,
            forward=args.precision,
            accumulate=args.accumulate,
            info=info,
        )
    except RomeError as exc:
        sys.stderr.write(f"error: rank {info.rank}: {exc}\n")
        return 2 if isinstance(exc, BadRequestError) else 1
    finally:
        shutdown(info)
    if info.is_main:
        m = outcome.stats.meta
        state = "already cached" if outcome.cached else f"collected on {outcome.world_size} rank(s)"
        sys.stdout.write(
            f"{m.module}: {m.n_texts} texts, {m.n_tokens} tokens of {m.corpus!r} ({state}, "
            f"{m.seconds:.1f} s) -> {outcome.path}\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
