"""Covariance statistics on two gloo processes equal a single process's run."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rome import covariance as cov
from rome import load_model
from rome.distributed import DistInfo, run_stats, shard

N_TEXTS = 250
MODULE = "transformer.h.1.mlp.c_proj"  # tiny-gpt2's preset layer


def _write_corpus(folder: Path, n: int = 300) -> Path:
    """Paragraphs of 3 to 60 words: uneven lengths, so the ranks' token counts differ."""
    words = (
        "the city of paris rome tower river capital japan company music actor born "
        "in was is a an and london berlin wrote played"
    ).split()
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    paras = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 60))) for _ in range(n)]
    (folder / "corpus.txt").write_text("\n\n".join(paras))
    return folder


def _env(cache: Path) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ROME_WORKBENCH_CACHE": str(cache)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def test_shard_is_round_robin_and_covers_everything() -> None:
    items = [str(i) for i in range(11)]
    parts = [list(shard(items, r, 3)) for r in range(3)]
    assert parts[0] == ["0", "3", "6", "9"] and parts[2] == ["2", "5", "8"]
    assert sorted(sum(parts, []), key=int) == items


def test_one_process_run_stats_writes_the_cache(tmp_path: Path) -> None:
    lm = load_model("tiny-gpt2")
    corpus = str(_write_corpus(tmp_path / "corpus", 40))
    out = run_stats(lm, corpus=corpus, n_texts=30, cache=tmp_path / "c", info=DistInfo())
    assert not out.cached and out.path is not None and out.path.is_file()
    assert out.stats.meta.n_texts == 30 and out.stats.meta.extra["world_size"] == 1
    again = run_stats(lm, corpus=corpus, n_texts=30, cache=tmp_path / "c")
    assert again.cached and torch.equal(again.stats.matrix, out.stats.matrix)


@pytest.mark.slow
@pytest.mark.ci  # the proof that sharded statistics equal one process's: keep it in CI
def test_two_gloo_processes_equal_one(tmp_path: Path) -> None:
    corpus = _write_corpus(tmp_path / "corpus")
    cache = tmp_path / "cache"
    t0 = time.perf_counter()
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",  # what the torchrun script runs
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "rome.distributed",
            "--model",
            "tiny-gpt2",
            "--corpus",
            str(corpus),
            "--n-texts",
            str(N_TEXTS),
            "--batch-tokens",
            "512",
        ],
        env=_env(cache),
        capture_output=True,
        text=True,
        timeout=300,
    )
    wall_two = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr[-3000:]
    assert "collected on 2 rank(s)" in res.stdout
    path = cov.stats_path(cache, "testing_gpt2", str(corpus), MODULE, "float32", N_TEXTS)
    two = cov.load_stats(path, expected_dim=256)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["extra"]["world_size"] == 2 and meta["extra"]["backend"] == "gloo"

    lm = load_model("tiny-gpt2")
    t1 = time.perf_counter()
    one = cov.compute_stats(
        lm.model, lm.tokenizer, "testing_gpt2", 1, MODULE, str(corpus), N_TEXTS, 32, seed=0
    )
    single = time.perf_counter() - t1

    scale = float(one.matrix.abs().max())
    diff = float((two.matrix - one.matrix).abs().max())
    assert diff <= 1e-6 * scale
    assert (
        two.meta.n_tokens == one.meta.n_tokens and two.meta.n_texts == one.meta.n_texts == N_TEXTS
    )
    shares = meta["extra"]["per_rank"]
    assert sum(s["n_tokens"] for s in shares) == one.meta.n_tokens
    assert [s["n_texts"] for s in shares] == [N_TEXTS // 2, N_TEXTS - N_TEXTS // 2]
    print(
        f"\ncovariance over {one.meta.n_tokens} tokens of {N_TEXTS} texts: single process "
        f"{single:.3f} s collecting; two gloo ranks {two.meta.seconds:.3f} s collecting, "
        f"{wall_two:.1f} s wall with torchrun start-up; max |diff| {diff:.2e} "
        f"({diff / scale:.2e} of the largest entry)"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_ranks_that_disagree_are_refused_before_collecting(tmp_path: Path) -> None:
    corpus = _write_corpus(tmp_path / "corpus", 40)
    cache = tmp_path / "cache"
    port = _free_port()
    procs = []
    for rank, layer in ((0, 1), (1, 2)):
        env = {
            **_env(cache),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        cmd = [sys.executable, "-m", "rome.distributed", "--model", "tiny-gpt2"]
        cmd += ["--corpus", str(corpus), "--n-texts", "20", "--layer", str(layer)]
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 2, err[-2000:]
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "disagree" in lines[0] and "layer=2" in lines[0], err
    assert not list(cache.rglob("*.safetensors"))  # nothing was collected or written
