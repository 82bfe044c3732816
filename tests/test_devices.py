"""Devices, dtypes and device maps: bad values are one-line errors; a device-mapped
SmolLM2 edits exactly as the plain load; a mistyped hub id fails fast offline."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import EDIT, one_line, runner

from rome import Editor, EditRequest, load_model
from rome.devices import resolve_device, resolve_device_map, resolve_dtype
from rome.errors import DeviceMapError, InvalidDeviceError, UnknownPresetError
from workbench.cli import app


def test_bad_devices_dtypes_and_strategies_are_named_errors() -> None:
    with pytest.raises(InvalidDeviceError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(InvalidDeviceError, match="unknown device"):
        resolve_device("cuda:x")
    with pytest.raises(InvalidDeviceError, match="unknown dtype 'int8'"):
        resolve_dtype("int8")
    with pytest.raises(InvalidDeviceError, match="unknown device-map strategy 'everywhere'"):
        resolve_device_map("everywhere")
    with pytest.raises(InvalidDeviceError, match="unknown device"):
        resolve_device_map({"": "tpu"})
    assert resolve_device_map("none") is None and resolve_device_map("auto") == "auto"
    if not torch.cuda.is_available():
        with pytest.raises(InvalidDeviceError, match="no GPU is visible"):
            resolve_device("cuda")


def test_device_maps_do_not_apply_to_in_process_models() -> None:
    with pytest.raises(DeviceMapError, match="do not apply to 'tiny-gpt2'"):
        load_model("tiny-gpt2", device_map="auto")


def test_loaded_model_says_where_the_edited_layer_lives(tiny_gpt2) -> None:
    lm = tiny_gpt2
    assert lm.edited_layer_device() == "cpu" and lm.device == torch.device("cpu")
    mem = lm.memory_per_device()
    assert list(mem) == ["cpu"] and mem["cpu"] >= lm.memory_bytes()


@pytest.mark.parametrize(
    ("extra", "code", "words"),
    [
        (["--device", "tpu"], 2, "unknown device 'tpu'"),
        (["--dtype", "int8"], 2, "unknown dtype 'int8'"),
        (["--device-map", "everywhere"], 2, "unknown device-map strategy"),
        (["--device-map", "auto"], 2, "device maps do not apply"),
    ],
)
def test_cli_device_errors_are_one_line(extra: list[str], code: int, words: str) -> None:
    res = runner.invoke(app, [*EDIT, *extra])
    assert res.exit_code == code, res.output
    assert words in one_line(res.stderr)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cli_cuda_without_gpu_is_one_line() -> None:
    for cmd in (EDIT, ["stats", "--model", "tiny-gpt2"]):
        res = runner.invoke(app, [*cmd, "--device", "cuda"])
        assert res.exit_code == 2
        assert "no GPU is visible" in one_line(res.stderr)


def test_stats_device_tpu_exits_2() -> None:
    res = runner.invoke(app, ["stats", "--model", "tiny-gpt2", "--device", "tpu"])
    assert res.exit_code == 2 and "unknown device 'tpu'" in one_line(res.stderr)


def test_info_with_a_model_shows_the_edited_layer() -> None:
    res = runner.invoke(app, ["info", "--model", "tiny-gpt2"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "transformer.h.1.mlp.c_proj on cpu" in res.stdout
    assert "memory cpu" in res.stdout
    data_row = next(line for line in res.stdout.splitlines() if "bundled data" in line)
    data_dir = data_row.split("│")[2].strip()
    assert (Path(data_dir) / "counterfact" / "sample.json").is_file(), data_dir


def test_unknown_hub_id_fails_fast_without_hub_noise() -> None:
    """In process: the hub probe (or HF_HUB_OFFLINE) answers before any retry."""
    env_before = os.environ.pop("HF_HUB_OFFLINE", None)
    try:
        t0 = time.perf_counter()
        with pytest.raises(UnknownPresetError, match="no-such-model-xyz"):
            load_model("no-such-model-xyz")
        elapsed = time.perf_counter() - t0
    finally:
        if env_before is not None:
            os.environ["HF_HUB_OFFLINE"] = env_before
    print(f"\nunknown model answered in {elapsed:.2f} s (load_model only)")
    assert elapsed < 10  # huggingface_hub's retries took 27-33 s here


def test_unknown_model_cli_one_line_no_hub_warnings() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE",)}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "workbench.cli", *EDIT]
    cmd[cmd.index("tiny-gpt2")] = "no-such-model-xyz"
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - t0
    print(f"\nedit --model no-such-model-xyz: exit {res.returncode} in {elapsed:.1f} s wall")
    assert res.returncode == 2
    line = one_line(res.stderr)
    assert "no-such-model-xyz" in line and "WARNING" not in res.stderr
    assert "Retrying" not in res.stderr


EIFFEL = EditRequest("{} is located in the city of", "The Eiffel Tower", "Rome", "Paris")
TEMPLATES = ["{}", "The news today. {}", "In the morning, I went to the. {}"]


@pytest.mark.slow
def test_device_map_auto_edit_equals_the_plain_load() -> None:
    plain = load_model("smollm2-135m")
    mapped = load_model("smollm2-135m", device_map="auto")
    assert mapped.device_map is not None and mapped.edited_layer_device() == "cpu"
    assert sum(mapped.memory_per_device().values()) == sum(plain.memory_per_device().values())
    results = []
    for lm in (plain, mapped):
        hp = lm.hparams.replace(v_num_grad_steps=6)  # the comparison, not the edit's quality
        ed = Editor(lm.model, lm.tokenizer, hp, templates=TEMPLATES)
        ed.set_covariance(lm.hparams.layer, None, "identity")
        t0 = time.perf_counter()
        results.append((ed.compute(EIFFEL, mode="original"), time.perf_counter() - t0))
    (a, ta), (b, tb) = results
    du = float((a.u - b.u).abs().max())
    dv = float((a.v - b.v).abs().max() / a.v.abs().max())
    print(
        f"\nSmolLM2 layer {a.layer}: plain {ta:.1f} s, device_map=auto {tb:.1f} s; "
        f"|dW| {a.update_norm:.3f} vs {b.update_norm:.3f}; max |du| {du:.2e}, "
        f"max |dv| {dv:.2e} relative; p(Rome) after {a.p_new_after:.3f} vs {b.p_new_after:.3f}"
    )
    assert torch.allclose(a.u, b.u, atol=1e-6) and dv < 1e-5
    assert a.p_new_after == pytest.approx(b.p_new_after, rel=1e-4)
    assert a.p_new_after > a.p_new_before


@pytest.mark.slow
def test_device_map_offloading_the_edited_layer_is_refused() -> None:
    dmap: dict[str, str] = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.norm": "cpu",
        "lm_head": "cpu",
    }
    for i in range(30):
        dmap[f"model.layers.{i}"] = "disk" if i == 5 else "cpu"
    with pytest.raises(DeviceMapError, match="on disk"):
        load_model("smollm2-135m", device_map=dmap)  # the preset edits layer 5
    lm = load_model("smollm2-135m", device_map=dmap, layer=6)
    assert lm.edited_layer_device() == "cpu" and "disk" in lm.memory_per_device()
