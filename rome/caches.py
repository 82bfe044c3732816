"""What is worth computing once per model and layer: templates, statistics, C⁻¹ factors.

One :class:`Caches` per :class:`~rome.Editor`; the methods reach it through
their :class:`~rome.context.EditContext`. Everything here describes the
unedited model: statistics and sampled templates are made inside the owner's
``base_weights()`` (every edited layer back at its base weight for the while).

An editor and its variants (the same model under another method's preset:
``Editor.variant``) share one :class:`Shared`: the second moments read from disk
(keyed by every setting that names or makes them, so a variant with other
statistics settings reads its own) and the family's z, kept for one state of the
weights (:meth:`Caches.z`): MEMIT, EMMET and AlphaEdit with the same z settings,
templates and last layer optimise the same z, so Compare computes it once.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from . import bundle
from . import covariance as cov
from .hparams import EditHparams
from .progress import Progress
from .templates import cached_templates, normalise_templates


class Shared:
    """What an editor and its variants share (see the module's docstring)."""

    #: how many states of the weights keep their z (the latest used; a replay changes
    #: the weights at every step, the app goes back to one with undo)
    Z_STATES = 4

    def __init__(self) -> None:
        self.stats: dict[tuple[Any, ...], cov.SecondMoment] = {}
        self._z: OrderedDict[str, dict[Any, Any]] = OrderedDict()

    def z(self, weights: str, key: Any, make: Callable[[], Any]) -> tuple[Any, bool]:
        """(the value for ``key`` on the weights whose fingerprint is ``weights``, whether
        it was kept from an earlier call)."""
        kept = self._z.setdefault(weights, {})
        self._z.move_to_end(weights)
        while len(self._z) > self.Z_STATES:
            self._z.popitem(last=False)
        hit = key in kept
        if not hit:
            kept[key] = make()
        return kept[key], hit


class Caches:
    """Templates, second moments, covariance factors and any value a method keeps."""

    def __init__(
        self,
        model: nn.Module,
        tok: PreTrainedTokenizerBase,
        hparams: Callable[[], EditHparams],
        cache: Path | None,
        model_key: str,
        base_weights: Callable[..., contextlib.AbstractContextManager[None]],
        templates: Sequence[str] | None = None,
        weights_print: Callable[[Sequence[int]], str] | None = None,
    ):
        self.model, self.tok = model, tok
        # the fingerprint of the weights as they are now, over every edited layer and
        # the ones given (None: no such thing, nothing is kept per weights state)
        self.weights_print = weights_print
        self.shared = Shared()
        self._hp = hparams
        self.cache = cache
        self.model_key = model_key
        self.base_weights = base_weights
        self._templates = normalise_templates(templates) if templates is not None else None
        self._factors: dict[int, cov.CovFactor] = {}
        self._stats_meta: dict[int, cov.StatsMeta | None] = {}
        self._values: dict[Any, Any] = {}

    @property
    def hp(self) -> EditHparams:
        return self._hp()

    def cached(self, key: Any, make: Callable[[], Any]) -> Any:
        """A value computed once per editor (a method's templates, projectors...)."""
        if key not in self._values:
            self._values[key] = make()
        return self._values[key]

    def put(self, key: Any, value: Any) -> None:
        """Set a kept value (a resumed run's ρ)."""
        self._values[key] = value

    @property
    def has_templates(self) -> bool:
        return self._templates is not None

    def templates(self) -> list[str]:
        """ROME's context templates, sampled (once, cached) from the unedited model."""
        if self._templates is None:
            hp = self.hp
            with self.base_weights():
                self._templates = cached_templates(
                    self.model,
                    self.tok,
                    self.model_key,
                    hp.context_template_length_params,
                    hp.template_seed,
                    self.cache / "templates" if self.cache is not None else None,
                    shipped=bundle.bundled_templates(
                        self.model_key,
                        "rome",
                        bundle.rome_template_settings(
                            hp.context_template_length_params, hp.template_seed
                        ),
                    ),
                )
        return self._templates

    def set_covariance(
        self, layer: int, matrix: torch.Tensor | None, description: str = ""
    ) -> None:
        """Use this C (``None``: identity) for ``layer`` instead of collected statistics."""
        self._factors[layer] = cov.CovFactor(matrix, self.hp.mom2_ridge, description)
        self._stats_meta[layer] = None

    def stats_file(self, layer: int, corpus: str | None = None) -> Path | None:
        if self.cache is None:
            return None
        hp = self.hp
        return cov.stats_path(
            self.cache,
            self.model_key,
            corpus or hp.mom2_dataset,
            hp.weight_module(layer),
            hp.mom2_dtype,
            hp.mom2_n_samples,
        )

    def stats(
        self, layer: int, progress: Progress | None = None, corpus: str | None = None
    ) -> cov.SecondMoment:
        """Second moment for ``layer``: read (or collected on the unedited weights and
        saved) once per editor and its variants; the factor and a method's C₀ share it."""
        key = self._stats_key(layer, corpus)
        got = self.shared.stats.get(key)
        if got is None:
            got = self.shared.stats[key] = self._read_stats(layer, progress, corpus)
        return got

    def _stats_key(self, layer: int, corpus: str | None) -> tuple[Any, ...]:
        """Everything that names the statistics file or makes the statistics."""
        hp = self.hp
        # no corpus: the shipped statistics where there are some; a corpus named: collected
        # from it (so ``corpus=None`` and the preset's own corpus are two keys)
        return (
            str(self.cache), self.model_key, hp.weight_module(layer), corpus, hp.mom2_dataset,
            hp.mom2_n_samples, hp.mom2_max_len, hp.mom2_dtype, hp.template_seed,
        )  # fmt: skip

    def z(self, layers: Sequence[int], key: Any, make: Callable[[], Any]) -> tuple[Any, bool]:
        """(``make()`` for ``key`` on the model as it is now, whether it was kept from an
        earlier call on the same weights): kept per the fingerprint of the edited layers
        and ``layers`` (the others hold their base weights), shared with the variants."""
        if self.weights_print is None:
            return make(), False
        return self.shared.z(self.weights_print(layers), key, make)

    def _read_stats(
        self, layer: int, progress: Progress | None, corpus: str | None
    ) -> cov.SecondMoment:
        path = self.stats_file(layer, corpus)
        width = cov.expected_width(self.model, self.hp.weight_module(layer))
        if path is not None and path.is_file():
            return cov.load_stats(path, expected_dim=width)
        shipped = self._bundled_stats(layer, width) if corpus is None else None
        if shipped is not None:
            if progress:
                progress("statistics (shipped with the package)", 1, 1)
            return shipped
        prog = (lambda d, t: progress("covariance", d, t)) if progress else None
        with self.base_weights():
            stats = self._collect_stats(layer, prog, corpus)
        if path is not None:
            cov.save_stats(path, stats)
        return stats

    def _bundled_stats(self, layer: int, width: int) -> cov.SecondMoment | None:
        """The package's statistics for this model and layer, made with this preset's
        corpus settings (rome/bundled), else ``None``."""
        hp = self.hp
        settings = bundle.stats_settings(
            hp.mom2_dataset, hp.mom2_n_samples, hp.mom2_max_len, hp.mom2_dtype, hp.template_seed
        )
        return bundle.load_bundled_stats(self.model_key, hp.weight_module(layer), settings, width)

    def _collect_stats(
        self, layer: int, prog: Callable[[int, int], None] | None, corpus: str | None
    ) -> cov.SecondMoment:
        hp = self.hp
        return cov.compute_stats(
            self.model,
            self.tok,
            self.model_key,
            layer,
            hp.weight_module(layer),
            corpus or hp.mom2_dataset,
            hp.mom2_n_samples,
            hp.mom2_max_len,
            hp.mom2_dtype,
            hp.template_seed,
            prog,
            self.cache / "stats" / self.model_key if self.cache is not None else None,
        )

    def factor(self, layer: int, progress: Progress | None = None) -> cov.CovFactor:
        """The ``C⁻¹`` solver for ``layer``, computed once."""
        if layer not in self._factors:
            if self.hp.covariance == "identity":
                self.set_covariance(layer, None, "identity")
            else:
                stats = self.stats(layer, progress)
                m = stats.meta
                desc = f"{m.corpus}: {m.n_texts} texts, {m.n_tokens} tokens"
                self._factors[layer] = cov.CovFactor(stats.matrix, self.hp.mom2_ridge, desc)
                self._stats_meta[layer] = m
        return self._factors[layer]

    def stats_fingerprint(self, layer: int) -> str:
        """The hash of ``layer``'s C (what its factor records), without factoring it."""
        if layer in self._factors:
            return self._factors[layer].fingerprint
        if self.hp.covariance == "identity":
            return "identity"
        return cov._tensor_digest(self.stats(layer).matrix)

    def stats_meta(self, layer: int) -> cov.StatsMeta | None:
        return self._stats_meta.get(layer)
