"""The edit form's values and their validation (no Textual here, so it is testable alone)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from rome import MODES, BadRequestError, EditRequest
from rome.methods import METHODS, method_names

#: the editing methods the form offers, in the registry's order (ROME first)
FORM_METHODS = tuple(method_names())


def has_key_modes(method: str) -> bool:
    """Whether ``method`` has key modes and edits the one layer the form names (ROME)."""
    m = METHODS.get(method)
    return bool(m is not None and m.capabilities.key_modes)


FIELDS = (
    "prompt",
    "subject",
    "target_new",
    "target_true",
    "paraphrase",
    "neighbourhood",
    "layer",
)


@dataclass(frozen=True)
class EditForm:
    """What the user typed: the request plus the probes, the method and ROME's key mode / layer.

    ``mode`` and ``layer`` are ROME's; another ``method`` edits its preset's layers.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrase: str = ""
    neighbourhood: str = ""
    mode: str = "rrome"
    layer: int | None = None
    generation_prompts: tuple[str, ...] = field(default_factory=tuple)
    method: str = "rome"

    @property
    def is_rome(self) -> bool:
        """Whether the form's key mode and layer apply (a method with key modes: ROME)."""
        return has_key_modes(self.method)

    def request(self) -> EditRequest:
        return EditRequest(self.prompt, self.subject, self.target_new, self.target_true)

    @property
    def text(self) -> str:
        """The edit prompt with the subject written in (no validation)."""
        return self.prompt.replace("{}", self.subject, 1)

    def probes(self) -> list[tuple[str, str]]:
        """``(name, prompt text)`` of the probes to score: prompt, paraphrase, neighbour."""
        out = [("prompt", self.text)]
        if self.paraphrase.strip():
            out.append(("paraphrase", self.paraphrase.strip()))
        if self.neighbourhood.strip():
            out.append(("neighbour", self.neighbourhood.strip()))
        return out

    def generation_texts(self, limit: int = 5) -> list[str]:
        """Prompts for before/after generation: the edit prompt, its probes, the extras."""
        seen: list[str] = []
        for _, text in self.probes():
            if text not in seen:
                seen.append(text)
        for p in self.generation_prompts:
            p = p.replace("{}", self.subject).strip()
            if p and p not in seen:
                seen.append(p)
        if len(seen) < 3 and self.subject.strip():
            extra = f"{self.subject.strip()} is"
            if extra not in seen:
                seen.append(extra)
        return seen[:limit]

    def with_mode(self, mode: str) -> EditForm:
        return replace(self, mode=mode)

    def same_edit(self, other: EditForm | None) -> bool:
        """Same request and method, and for ROME the same layer and mode (probes may differ)."""
        return (
            other is not None
            and self.request() == other.request()
            and self.method == other.method
            and (not self.is_rome or (self.layer == other.layer and self.mode == other.mode))
        )


def parse_layer(text: str) -> int | None:
    """The layer field: empty means the preset's layer."""
    text = text.strip()
    return int(text) if text else None


def field_errors(values: dict[str, str], n_layers: int | None = None) -> dict[str, str]:
    """Per-field messages for the raw form values (empty dict: the form is valid).

    Mirrors :meth:`EditRequest.validate` field by field so the reason lands on
    the right field; the request's own check runs last as the authority.
    """
    errors: dict[str, str] = {}
    prompt = values.get("prompt", "")
    n = prompt.count("{}")
    if n != 1:
        errors["prompt"] = "needs exactly one {} where the subject goes" + (
            f" (found {n})" if n else ": e.g. '{} is located in'"
        )
    elif "{" in prompt.replace("{}", "") or "}" in prompt.replace("{}", ""):
        errors["prompt"] = "has a stray brace besides {}"
    subject = values.get("subject", "")
    if not subject.strip():
        errors["subject"] = "is empty: the subject fills the {} of the prompt"
    new = values.get("target_new", "")
    if not new.strip():
        errors["target_new"] = "is empty: what the model should say instead"
    true = values.get("target_true", "")
    if true.strip() and true.strip() == new.strip():
        errors["target_true"] = "equals the new target: nothing to edit"
    # the layer is a key-mode method's (ROME's); another method edits its preset's layers
    rome_only = has_key_modes(values.get("method", FORM_METHODS[0]))
    layer = values.get("layer", "").strip() if rome_only else ""
    if layer:
        try:
            value = int(layer)
        except ValueError:
            errors["layer"] = "must be a whole number (empty: the preset's layer)"
        else:
            if value < 0 or (n_layers is not None and value >= n_layers):
                top = f"0..{n_layers - 1}" if n_layers is not None else "≥ 0"
                errors["layer"] = f"must be in {top}"
    method = values.get("method", FORM_METHODS[0])
    if method not in METHODS:
        errors["method"] = f"must be one of {', '.join(method_names())}"
    mode = values.get("mode", "rrome")
    if has_key_modes(method) and mode not in MODES:
        errors["mode"] = f"must be one of {', '.join(MODES)}"
    if not errors:
        try:
            EditRequest(prompt, subject, new, true.strip() or None).validate()
        except BadRequestError as exc:
            errors["prompt"] = str(exc)
    return errors


def form_from_values(values: dict[str, str], generation_prompts: tuple[str, ...] = ()) -> EditForm:
    """An :class:`EditForm` from raw values that passed :func:`field_errors`."""
    true = values.get("target_true", "").strip()
    method = values.get("method", FORM_METHODS[0])
    return EditForm(
        prompt=values["prompt"],
        subject=values["subject"],
        target_new=values["target_new"],
        target_true=true or None,
        paraphrase=values.get("paraphrase", ""),
        neighbourhood=values.get("neighbourhood", ""),
        mode=values.get("mode", "rrome"),
        layer=parse_layer(values.get("layer", "")) if has_key_modes(method) else None,
        generation_prompts=generation_prompts,
        method=method,
    )
