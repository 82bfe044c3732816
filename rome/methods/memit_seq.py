"""MEMIT_seq (SasyaTitech/NAS ``baselines/memit/memit_seq_main.py``): MEMIT with the keys
of every applied step in its solve.

Per layer i, float64: (λC₀ + cache_c[i] + KKᵀ) A = K, Δ = R Aᵀ, where cache_c[i]
is Σ K Kᵀ (float32) of the earlier steps, each K read on the model after that
step's layers were all written (the published code recomputes them after its
layer loop). It is the same computation as ``memit`` with ``memit_accumulate``
(tests/test_methods_memit_seq.py checks them equal bit for bit over two steps),
under its own name and its own carried state, so a run of it says what it is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .memit import Memit
from .registry import register

if TYPE_CHECKING:
    from ..editor import Editor


class MemitSeq(Memit):
    """MEMIT_seq: λ = ``mom2_update_weight``; the accumulated keys always on (MEMIT's
    solve and ``after_apply`` with its own name: its own carried Σ K Kᵀ)."""

    name = "memit-seq"
    keeps_keys = True

    def settings(self, editor: Editor, options: dict[str, Any]) -> dict[str, Any]:
        out = super().settings(editor, options)
        out["accumulate"] = True
        return out


register(MemitSeq())
