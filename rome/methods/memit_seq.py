"""MEMIT_seq (SasyaTitech/NAS ``baselines/memit/memit_seq_main.py``): MEMIT with the keys
of every applied step in its solve.

Per layer i, float64: (λC₀ + cache_c[i] + KKᵀ) A = K, Δ = R Aᵀ, where cache_c[i]
is Σ K Kᵀ (float32) of the earlier steps, each K read on the model after that
step's layers were all written (the published code recomputes them after its
layer loop). It is the same computation as ``memit`` with ``accumulate``
(tests/test_methods_memit_seq.py checks them equal bit for bit over two steps),
under its own name and its own carried state, so a run of it says what it is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .base import setting
from .memit import Memit, MemitSettings


@dataclass(frozen=True)
class MemitSeqSettings(MemitSettings):
    accumulate: bool = setting(True, "always on: MEMIT_seq adds the Σ K Kᵀ of applied steps")


class MemitSeq(Memit):
    """MEMIT_seq: MEMIT's solve and state with the accumulated keys always on."""

    name = "memit-seq"
    summary = "memit with the keys of every applied step"
    Settings = MemitSeqSettings

    def settings(self, hp: Any, overrides: Any = None) -> Any:
        return dataclasses.replace(super().settings(hp, overrides), accumulate=True)
