"""The F1 help screen: keys, tabs and the workflow."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

HELP = """\
# rome-workbench

Rank-one model editing (ROME) and the r-ROME correction, on a model you load.

## Keys (anywhere)

| key | action |
|---|---|
| F1 | this help (Esc closes it) |
| F2 | load the model named in the Model tab |
| F5 | compute the edit in the Edit tab (model unchanged) |
| F6 | compare the three key modes and the methods side by side |
| F7 | apply the edit: the F5 or F6 result on screen if the form is unchanged |
| F8 | undo the last applied edit |
| F9 | generate from the Generate tab's prompt |
| Esc | cancel the running job (between two steps) |
| F3 / F4 | previous / next tab (also Ctrl+PgUp / Ctrl+PgDn), in a text field too |
| Alt+1 … Alt+7 | that tab, in a text field too (where the terminal sends Alt) |
| 1 … 7 | that tab (when no text field has focus) |
| Ctrl+P | command palette: every action by name |
| q | quit (asks first while a job runs) |

Tab / Shift+Tab move between fields; Enter in a field computes the edit.
Once a model is loaded the cursor is in the Edit tab's Prompt field.

## Tabs

1. **Model**: choose a preset, hub id or local folder, device and dtype;
   the covariance statistics are prepared once per layer and cached.
2. **Edit**: prompt template with `{}` for the subject, targets, optional
   paraphrase and neighbour probes, the method (rome, memit, emmet,
   alphaedit), and ROME's key mode and layer (off for the other methods,
   which edit their preset's layers). Examples fill it.
3. **Compare**: the update in the three key modes: ‖ΔW‖, its ratio to
   ‖W‖, the denominator, cos(k*, k(s)) and the probes before → after.
   A mode flagged DISABLING would likely damage the model. Below, every
   method beside the key modes (as `edit --method all`): ‖ΔW‖ per edited
   layer, p(new) and the efficacy before → after, a verdict across them.
   `a` (or "Apply selected row") applies the highlighted row's update as
   it was computed; a row computed before the model changed is refused.
4. **Generate**: greedy continuations before / after the last applied
   edit, changed words highlighted.
5. **Weights**: log10 ‖ΔW‖ of this session's edits, and ‖W − W₀‖.
6. **History**: every stored edit of this model with its figures (a
   replay's CounterFact scores pre → post); undo, revert to the base
   weights, re-apply stored edits onto the loaded model, and "Save
   model…": the base model plus a run's edits as a Hugging Face folder.
7. **Replay**: every setting of the CLI's `replay`, with its defaults
   (method, batch size, key mode, layer, GLUE tasks / interval / limit /
   scoring / calibration, the perplexity probe, the stabilisers, --guard,
   the retention size M); live charts: GLUE, perplexity and fluency,
   ‖ΔW‖ and ‖W − W₀‖, ‖W‖ / ‖W₀‖, retention; cancel keeps finished edits;
   interrupted runs, and runs whose writer process is gone, can be resumed.
8. **Runs**: any results database (`--db`, or Ctrl+O "Open database…"):
   its replay runs with their labels; Enter opens a run, `o` overlays it,
   `g` steps the GLUE chart through its tasks. Every panel of the `plot`
   command, the CounterFact scores under the three protocols, and the
   flagged edits: select one for its record. The list and the charts
   follow a replay another process is writing.

## Evaluation protocols

- **immediate**: each record scored right after its own edit (pre: just
  before it).
- **end of stream**: every record re-scored on the final model.
- **retention**: at every checkpoint, the first M edits re-scored on the
  model as it is then; an edit holds when its prompt prefers the new object.

## Key modes

| mode | update direction | key in Λ |
|---|---|---|
| original | k* (templated mean) | k(s) (bare prompt) |
| rrome | k* | k* |
| prompt | k(s) | k(s) |

When cos(k*, k(s)) is low, *original* divides by a small denominator and
its update can be huge (a disabling edit). *rrome* keeps the norm small but
the bare prompt may get less of the edit.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("escape,f1,q", "close", "Close help", id="help.close", tooltip="Close the help"),
    ]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-body"):
            yield Markdown(HELP)

    def action_close(self) -> None:
        self.dismiss(None)
