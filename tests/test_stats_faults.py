"""Covariance statistics faults (issue 10): bad imports are refused before anything is
written, a damaged cache file is named with how to rebuild it, a bad cache folder is
one line. Each case runs through the CLI and checks the exit code, a single message,
no traceback, and that the good cache file is byte for byte as it was."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import EDIT, one_line, runner

from rome import covariance as cov
from workbench.cli import app

MODULE = "transformer.h.1.mlp.c_proj"
WIDTH = 256  # tiny-gpt2's MLP width: the input of c_proj


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache with tiny-gpt2's good statistics (sampled corpus, the preset's 64 texts)."""
    root = tmp_path_factory.mktemp("stats-cache")
    res = runner.invoke(
        app, ["stats", "--model", "tiny-gpt2"], env={"ROME_WORKBENCH_CACHE": str(root)}
    )
    assert res.exit_code == 0, res.output
    return root


def stats_file(root: Path) -> Path:
    return cov.stats_path(root, "testing_gpt2", "sampled", MODULE, "float32", 64)


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def invoke(root: Path, args: list[str]):
    return runner.invoke(app, args, env={"ROME_WORKBENCH_CACHE": str(root)})


def write_npz(path: Path, mom2: np.ndarray, count: float = 10.0) -> Path:
    np.savez(path, **{"mom2.mom2": mom2, "mom2.count": np.array(count)})
    return path


def spd(d: int, seed: int = 0) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal((d, d)).astype(np.float32)
    return a @ a.T + d * np.eye(d, dtype=np.float32)


def bad_npz(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.npz"
    if kind == "wrong-shape":
        return write_npz(path, spd(5))
    if kind == "non-finite":
        m = spd(WIDTH)
        m[3, 3] = np.inf
        return write_npz(path, m)
    if kind == "non-symmetric":
        m = spd(WIDTH)
        m[0, 1] += 10 * float(np.abs(m).max())
        return write_npz(path, m)
    if kind == "zero-count":
        return write_npz(path, spd(WIDTH), count=0)
    if kind == "not-npz":
        path.write_text("this is not a zip archive\n")
        return path
    if kind == "missing":
        return path
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("wrong-shape", "is 5x5 but the edited module's input has width 256"),
        ("non-finite", "NaN or infinite"),
        ("non-symmetric", "not symmetric"),
        ("zero-count", "mom2.count is 0"),
        ("not-npz", "is not an .npz file"),
        ("missing", "no such file"),
    ],
)
def test_bad_import_is_refused_and_the_cache_is_unchanged(
    cache: Path, tmp_path: Path, kind: str, words: str
) -> None:
    before = snapshot(cache)
    res = invoke(
        cache, ["stats", "--model", "tiny-gpt2", "--import-npz", str(bad_npz(tmp_path, kind))]
    )
    assert res.exit_code == 2, res.output
    assert words in one_line(res.stderr)
    assert snapshot(cache) == before  # nothing written, no temporary file left behind


def test_good_import_replaces_the_cache_and_edits_read_it(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    good = write_npz(tmp_path / "good.npz", spd(WIDTH), count=4.0)
    res = invoke(root, ["stats", "--model", "tiny-gpt2", "--import-npz", str(good)])
    assert res.exit_code == 0, res.output
    st = cov.load_stats(stats_file(root), expected_dim=WIDTH)
    assert st.meta.corpus == "imported:good.npz" and st.meta.n_tokens == 4
    assert np.allclose(st.matrix.numpy(), spd(WIDTH) / 4.0)
    res = invoke(root, [*EDIT, "--json"])
    assert res.exit_code == 0, res.output
    assert "imported:good.npz" in res.stdout


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "no-metadata"])
def test_damaged_cache_file_is_named_with_how_to_rebuild(
    tmp_path: Path, cache: Path, damage: str
) -> None:
    root = tmp_path / "cache"
    path = stats_file(root)
    path.parent.mkdir(parents=True)
    good = stats_file(cache)
    data = good.read_bytes()
    path.with_suffix(".json").write_bytes(good.with_suffix(".json").read_bytes())
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "garbage":
        path.write_bytes(os.urandom(4096))
    else:
        path.write_bytes(data)
        path.with_suffix(".json").unlink()
    for args in (["stats", "--model", "tiny-gpt2"], EDIT):
        res = invoke(root, args)
        assert res.exit_code == 1, res.output
        msg = one_line(res.stderr)
        assert path.name in msg and "stats --force" in msg and "delete" in msg
    res = invoke(root, ["stats", "--model", "tiny-gpt2", "--force"])
    assert res.exit_code == 0, res.output
    rebuilt = cov.load_stats(path, expected_dim=WIDTH)
    assert rebuilt.matrix.shape == (WIDTH, WIDTH) and rebuilt.meta.n_texts == 64
    assert invoke(root, EDIT).exit_code == 0


def test_force_keeps_the_good_file_until_the_new_one_is_checked(tmp_path: Path) -> None:
    """save_stats refuses a bad matrix and leaves the cached file as it was."""
    import torch

    root = tmp_path / "cache"
    assert invoke(root, ["stats", "--model", "tiny-gpt2"]).exit_code == 0
    before = snapshot(root)
    path = stats_file(root)
    meta = cov.load_stats(path).meta
    bad = torch.eye(WIDTH)
    bad[0, 0] = float("nan")
    with pytest.raises(cov.BadStatsError):
        cov.save_stats(path, cov.SecondMoment(bad, meta), expected_dim=WIDTH)
    with pytest.raises(cov.BadStatsError):
        cov.save_stats(path, cov.SecondMoment(torch.eye(5), meta), expected_dim=WIDTH)
    assert snapshot(root) == before


def unwritable_folder(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    for candidate in (Path("/sys/kernel"), Path("/proc/sys")):  # root writes anywhere else
        if candidate.is_dir():
            return candidate
    pytest.skip("no unwritable folder for root on this system")


@pytest.mark.parametrize("where", ["file", "inside-file", "unwritable"])
def test_bad_cache_folder_is_one_line(tmp_path: Path, where: str) -> None:
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    root = {
        "file": a_file,
        "inside-file": a_file / "cache",
        "unwritable": unwritable_folder(tmp_path),
    }[where]
    for args in (["stats", "--model", "tiny-gpt2"], EDIT):
        res = invoke(root, args)
        assert res.exit_code == 2, res.output
        msg = one_line(res.stderr)
        assert "ROME_WORKBENCH_CACHE" in msg and str(root) in msg
    assert a_file.read_text() == "x"
