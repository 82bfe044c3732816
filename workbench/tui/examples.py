"""Example edits to start from, each with the probes that show what an edit does."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ExampleEdit:
    key: str
    title: str
    prompt: str
    subject: str
    target_new: str
    target_true: str
    paraphrase: str
    neighbourhood: str
    generation_prompts: tuple[str, ...] = field(default_factory=tuple)
    note: str = ""


EXAMPLES: tuple[ExampleEdit, ...] = (
    ExampleEdit(
        key="eiffel",
        title="Eiffel Tower → Rome",
        prompt="{} is located in the city of",
        subject="The Eiffel Tower",
        target_new="Rome",
        target_true="Paris",
        paraphrase="The Eiffel Tower can be found in the city of",
        neighbourhood="The Louvre is located in the city of",
        generation_prompts=("The Eiffel Tower is", "To see the Eiffel Tower, tourists travel to"),
        note="A clean edit in every key mode.",
    ),
    ExampleEdit(
        key="hamlet",
        title="Hamlet → Charles Dickens",
        prompt="{} was written by",
        subject="Hamlet",
        target_new="Charles Dickens",
        target_true="William Shakespeare",
        paraphrase="The author of Hamlet is",
        neighbourhood="Macbeth was written by",
        generation_prompts=("Hamlet is a play", "Toyota is a company from"),
        note="A disabling edit in the original mode on SmolLM2 (low cos(k*, k(s))).",
    ),
    ExampleEdit(
        key="toyota",
        title="Toyota → Germany",
        prompt="{} is a company from",
        subject="Toyota",
        target_new="Germany",
        target_true="Japan",
        paraphrase="Toyota, the car maker, comes from",
        neighbourhood="Honda is a company from",
        generation_prompts=("Toyota is known for", "The headquarters of Toyota are in"),
    ),
    ExampleEdit(
        key="darrieux",
        title="Danielle Darrieux → English",
        prompt="The mother tongue of {} is",
        subject="Danielle Darrieux",
        target_new="English",
        target_true="French",
        paraphrase="Danielle Darrieux grew up speaking",
        neighbourhood="The mother tongue of Jean Gabin is",
        generation_prompts=("Danielle Darrieux was",),
    ),
    ExampleEdit(
        key="messi",
        title="Lionel Messi → basketball",
        prompt="{} plays the sport of",
        subject="Lionel Messi",
        target_new="basketball",
        target_true="football",
        paraphrase="The sport Lionel Messi is famous for is",
        neighbourhood="Cristiano Ronaldo plays the sport of",
        generation_prompts=("Lionel Messi is",),
    ),
)

BY_KEY = {e.key: e for e in EXAMPLES}
