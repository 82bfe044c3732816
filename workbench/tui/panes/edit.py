"""The Edit tab: the edit form (validated on the fields) and the computed / applied result."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Button, Input, Select, Static

from rome import MODES
from rome.methods import get_method, method_names
from workbench.core.format import farrow, fnum, fseconds
from workbench.core.forms import (
    EditForm,
    field_errors,
    form_from_values,
    has_key_modes,
)
from workbench.core.records import AppliedInfo, EditOutcome
from workbench.core.verdict import Verdict

from ..examples import BY_KEY, EXAMPLES, ExampleEdit
from ..widgets.form_field import FormField

TEXT_FIELDS = {
    "prompt": (
        "Prompt",
        "e.g. {} is located in the city of",
        "Template: {} is where the subject goes",
    ),
    "subject": ("Subject", "e.g. The Eiffel Tower", "The subject, as it appears in the prompt"),
    "target_new": ("New target", "e.g. Rome", "What the model should say after the edit"),
    "target_true": ("True target", "optional, e.g. Paris", "The current answer (optional)"),
    "paraphrase": (
        "Paraphrase",
        "optional probe, e.g. The Eiffel Tower can be found in the city of",
        "Another wording of the prompt: the edit should carry over",
    ),
    "neighbourhood": (
        "Neighbour",
        "optional probe, e.g. The Louvre is located in the city of",
        "Another subject with the same true answer: the edit should not touch it",
    ),
}
KEY_MODE_HINT = Text.assemble(
    ("Key modes  ", "bold"),
    ("original", "bold"),
    ": ROME as published (k* direction, k(s) in Λ); can explode when cos(k*, k(s)) is low.\n",
    ("rrome", "bold"),
    ": r-ROME, k* for both; small norms, the bare prompt may get less of the edit.\n",
    ("prompt", "bold"),
    ": k(s) for both; the edit holds on the prompt, weaker on paraphrases.\n\n",
    ("The other methods", "bold"),
    " (MEMIT, EMMET, AlphaEdit and those after them: the Method list): on their preset's"
    " layers, no key mode.\n\n",
    ("Enter", "bold"),
    " in a field computes · ",
    ("F6", "bold"),
    " compares the key modes and the methods · examples: Ctrl+P, type 'Example'",
    style="dim",
)


def method_choices() -> list[tuple[str, str]]:
    """The method list, read from the registry when the form is made (a method registered
    by a test or a plug-in before the app starts is in it): each method's own summary."""
    return [(f"{name}: {get_method(name).summary}", name) for name in method_names()]


MODE_HELP = {
    "original": "original (ROME): k* direction, k(s) in Λ",
    "rrome": "rrome (r-ROME): k* for both",
    "prompt": "prompt: k(s) for both",
}


def verdict_text(v: Verdict, label: bool = True) -> Text:
    style = {"ok": "bold green", "warn": "bold yellow", "bad": "bold red", "refused": "bold red"}
    t = Text(v.label if label else "", style=style[v.level])
    if v.reasons:
        t.append((": " if label else "") + v.summary, style=style[v.level].replace("bold ", ""))
    return t


def outcome_table(o: EditOutcome) -> Table:
    """A rank-one record's figures (ROME's)."""
    r = o.result
    assert r is not None
    t = Table.grid(padding=(0, 2))
    t.add_column(style="dim", no_wrap=True)
    t.add_column()
    t.add_row(
        "‖ΔW‖",
        f"{fnum(r.update_norm)}  ({fnum(r.update_norm_ratio)} × ‖W‖ = {fnum(r.weight_norm)})",
    )
    t.add_row("denominator", fnum(r.denominator))
    t.add_row("cos(k*, k(s))", fnum(r.cos_kstar_ks))
    t.add_row("p(new) templated", farrow(r.p_new_before_templated, r.p_new_after_templated))
    last = r.v_star_trace[-1] if r.v_star_trace else {}
    if last:
        t.add_row(
            "v* loss",
            f"{fnum(last.get('loss'))} after {len(r.v_star_trace)} steps "
            f"(p {fnum(last.get('p_target'))})",
        )
    t.add_row("covariance", r.covariance)
    return t


def method_table(o: EditOutcome) -> Table:
    """A step's figures without a rank-one record (the batch methods): norms per layer."""
    t = Table.grid(padding=(0, 2))
    t.add_column(style="dim", no_wrap=True)
    t.add_column()
    t.add_row("method", f"{o.method} (preset {o.preset})")
    t.add_row("‖ΔW‖", f"{fnum(o.norm)}  ({fnum(o.ratio)} × ‖W‖ of the edited layers)")
    for layer, norm in o.layer_norms.items():
        t.add_row(f"  layer {layer}", fnum(norm))
    return t


def probes_table(o: EditOutcome) -> Table:
    t = Table(box=None, padding=(0, 1), show_edge=False, header_style="dim")
    t.add_column("probe", no_wrap=True)
    t.add_column("p(new) before→after", no_wrap=True)
    t.add_column("p(true) before→after", no_wrap=True)
    for b in o.before:
        a = o.probe(b.name, after=True)
        t.add_row(
            b.name,
            farrow(b.p_new, a.p_new if a else None),
            farrow(b.p_true, a.p_true if a else None) if b.p_true is not None else "–",
        )
    return t


class EditPane(Vertical):
    """Form on the left (or on top when narrow), result on the right (or below)."""

    class Submitted(Message):
        """Enter in a field: compute the edit."""

    def __init__(self) -> None:
        super().__init__(id="edit-pane")
        self.outcome: EditOutcome | None = None
        self.applied: AppliedInfo | None = None
        self.method_layers: dict[str, tuple[str, list[int]]] = {}  # method -> (preset, layers)
        self.generation_prompts: tuple[str, ...] = ()
        self.n_layers: int | None = None
        self.preset_layer: int | None = None

    def compose(self) -> ComposeResult:
        """The form's fields in screen order (long: a layout, read top to bottom)."""
        with VerticalScroll(id="edit-form"):
            yield FormField(
                "Example",
                Select(
                    [(e.title, e.key) for e in EXAMPLES],
                    prompt="custom edit",
                    id="f-example",
                    compact=True,
                    tooltip="Fill the form with an example edit",
                ),
                key="example",
            )
            for key, (label, placeholder, tip) in TEXT_FIELDS.items():
                yield FormField(
                    label,
                    Input(placeholder=placeholder, id=f"f-{key}", compact=True, tooltip=tip),
                    key=key,
                    id=f"ff-{key}",
                )
            yield FormField(
                "Method",
                Select(
                    method_choices(),
                    value="rome",
                    allow_blank=False,
                    id="f-method",
                    compact=True,
                    tooltip="The editing method: ROME (one layer, key mode below) or a batch "
                    "editor on its preset's layers",
                ),
                key="method",
                id="ff-method",
            )
            yield FormField(
                "Key mode",
                Select(
                    [(MODE_HELP[m], m) for m in MODES],
                    value="rrome",
                    allow_blank=False,
                    id="f-mode",
                    compact=True,
                    tooltip="Which keys build the update (see F1)",
                ),
                key="mode",
                id="ff-mode",
            )
            yield FormField(
                "Layer",
                Input(
                    placeholder="preset's layer",
                    id="f-layer",
                    type="integer",
                    compact=True,
                    tooltip="Empty: the preset's layer",
                ),
                key="layer",
                id="ff-layer",
            )
            with Horizontal(classes="buttons"):
                yield Button(
                    "Compute F5",
                    id="btn-compute",
                    variant="primary",
                    compact=True,
                    action="app.compute",
                    tooltip="Compute the update and its effect; the model is unchanged",
                )
                yield Button(
                    "Compare F6",
                    id="btn-compare",
                    compact=True,
                    action="app.compare",
                    tooltip="Compute ROME's three key modes and the batch methods side by side",
                )
                yield Button(
                    "Apply F7",
                    id="btn-apply",
                    variant="success",
                    compact=True,
                    action="app.apply",
                    tooltip="Apply the edit to the model (computes it first if needed)",
                )
            yield Static(KEY_MODE_HINT, id="edit-hint")
        with VerticalScroll(id="edit-result"):
            yield Static(
                Text(
                    "Fill the form (or pick an example) and press F5 to compute the edit, "
                    "F6 to compare key modes and methods, F7 to apply it.",
                    style="dim italic",
                ),
                id="edit-result-body",
            )

    # ----------------------------------------------------------- form
    def raw_values(self) -> dict[str, str]:
        values = {k: self.query_one(f"#f-{k}", Input).value for k in TEXT_FIELDS}
        values["layer"] = self.query_one("#f-layer", Input).value
        values["mode"] = str(self.query_one("#f-mode", Select).value)
        values["method"] = str(self.query_one("#f-method", Select).value)
        return values

    @property
    def method(self) -> str:
        return str(self.query_one("#f-method", Select).value)

    def set_methods(self, layers: dict[str, tuple[str, list[int]]]) -> None:
        """Each method's preset and edited layers on the loaded model (for the Layer field)."""
        self.method_layers = dict(layers)
        self._method_fields()

    def choose_method(self, method: str) -> None:
        self.query_one("#f-method", Select).value = method

    @on(Select.Changed, "#f-method")
    def _method_chosen(self, event: Select.Changed) -> None:
        self._method_fields()

    def _method_fields(self) -> None:
        """ROME's key mode and layer apply to ROME alone: off for another method."""
        method = self.method
        rome = has_key_modes(method)  # ROME's key mode and layer
        mode = self.query_one("#f-mode", Select)
        layer = self.query_one("#f-layer", Input)
        mode.disabled = not rome
        layer.disabled = not rome
        if rome:
            mode.tooltip = "Which keys build the update (see F1)"
            layer.tooltip = "Empty: the preset's layer"
            if self.preset_layer is not None and self.n_layers is not None:
                layer.placeholder = f"preset: {self.preset_layer} (0..{self.n_layers - 1})"
            else:
                layer.placeholder = "preset's layer"
        else:
            mode.tooltip = f"ROME's key mode: {method} has none"
            preset, layers = self.method_layers.get(method, ("", []))
            span = ", ".join(str(x) for x in layers) or "its preset's"
            layer.placeholder = f"{method}: layers {span}" + (f" ({preset})" if preset else "")
            layer.tooltip = f"{method} edits the layers of its preset" + (
                f" {preset}" if preset else ""
            )
        self.show_errors({})

    def set_model(self, n_layers: int, layer: int, default_mode: str) -> None:
        self.n_layers = n_layers
        self.preset_layer = layer
        self.query_one("#f-layer", Input).placeholder = f"preset: {layer} (0..{n_layers - 1})"
        if default_mode in MODES:
            self.query_one("#f-mode", Select).value = default_mode
        self._method_fields()

    def show_errors(self, errors: dict[str, str]) -> None:
        for ff in self.query(FormField):
            if ff.key in TEXT_FIELDS or ff.key in ("layer", "mode", "method"):
                ff.set_error(errors.get(ff.key))

    def read_form(self) -> EditForm | None:
        """The form, or None after marking the invalid fields (and focusing the first)."""
        errors = field_errors(self.raw_values(), self.n_layers)
        self.show_errors(errors)
        if errors:
            first = next(k for k in (*TEXT_FIELDS, "method", "mode", "layer") if k in errors)
            self.query_one(f"#f-{first}").focus()
            return None
        return form_from_values(self.raw_values(), self.generation_prompts)

    def fill(self, example: ExampleEdit) -> None:
        for key in TEXT_FIELDS:
            self.query_one(f"#f-{key}", Input).value = getattr(example, key)
        self.generation_prompts = example.generation_prompts
        self.show_errors({})

    @on(Select.Changed, "#f-example")
    def _example_chosen(self, event: Select.Changed) -> None:
        if isinstance(event.value, str) and event.value in BY_KEY:
            self.fill(BY_KEY[event.value])

    def focus_prompt(self) -> None:
        """Put the cursor in the Prompt field (where a new edit starts)."""
        self.query_one("#f-prompt", Input).focus()

    def choose_example(self, key: str) -> None:
        self.query_one("#f-example", Select).value = key

    @on(Input.Changed)
    def _recheck(self, event: Input.Changed) -> None:
        """Clear an error as soon as the field is fixed (errors appear on an action)."""
        shown = {ff.key for ff in self.query(FormField) if ff.has_class("-error")}
        if shown:
            errors = field_errors(self.raw_values(), self.n_layers)
            self.show_errors({k: v for k, v in errors.items() if k in shown})

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.post_message(self.Submitted())

    # ----------------------------------------------------------- result
    def show_computing(self, what: str) -> None:
        self.query_one("#edit-result-body", Static).update(Text(what + "…", style="italic"))
        self.reveal_result()

    def show_outcome(self, outcome: EditOutcome, applied: AppliedInfo | None = None) -> None:
        """A computed (or applied) update of any method: verdict, figures, probes."""
        self.outcome = outcome
        self.applied = applied
        req = outcome.form.request()
        r = outcome.result
        head = Text()
        head.append(f"{req.subject} → {req.target_new}", style="bold")
        if r is not None:  # a rank-one record (ROME's key mode, its one layer)
            where = f"{outcome.method}/{r.mode} · layer {r.layer}"
        else:
            layers = ", ".join(str(x) for x in outcome.layer_norms)
            where = f"{outcome.method} · layers {layers} · {outcome.preset}"
        head.append(f"   {where} · {fseconds(outcome.seconds)}\n", style="dim")
        self._applied_line(head, applied)
        verdict = Text("verdict  ", style="dim")
        verdict.append_text(verdict_text(outcome.verdict))
        table = outcome_table(outcome) if r is not None else method_table(outcome)
        body = Group(head, Text(""), verdict, table, Text(""), probes_table(outcome))
        self.query_one("#edit-result-body", Static).update(body)
        self.reveal_result()

    @staticmethod
    def _applied_line(head: Text, applied: AppliedInfo | None) -> None:
        if applied is not None:
            head.append(f"Applied as session edit #{applied.number}", style="bold green")
            if applied.run_id is not None:
                head.append(f" (run {applied.run_id}, seq {applied.seq})", style="dim")
            head.append(" · F8 undoes it", style="dim")
        else:
            head.append("Computed, not applied: F7 applies it", style="bold yellow")

    def reveal_result(self) -> None:
        """Bring the result into view (below the form when the screen is narrow)."""
        result = self.query_one("#edit-result", VerticalScroll)
        result.scroll_home(animate=False)
        if self.screen.has_class("-narrow"):
            self.call_after_refresh(self.scroll_to_widget, result, animate=False, top=True)

    def clear_applied(self) -> None:
        """After undo / revert: the shown result is no longer on the model."""
        if self.outcome is not None and self.applied is not None:
            self.show_outcome(self.outcome, None)
