"""The Model tab: choose and load a model; its device, memory, layers and covariance."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.suggester import SuggestFromList
from textual.widgets import Button, Input, Select, Static

from rome import list_presets
from rome.devices import DEVICE_MAP_STRATEGIES
from workbench.core.format import fbytes, fseconds
from workbench.core.records import ModelInfo

from ..widgets.form_field import FormField

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
NO_MAP = "none"
DEVICE_MAPS = (NO_MAP, *DEVICE_MAP_STRATEGIES)


def preset_names(aliases: bool = True) -> list[str]:
    names: list[str] = []
    try:
        for hp in list_presets().values():
            names += [hp.name, *(hp.aliases if aliases else [])]
    except Exception:  # a broken preset file must not stop the app
        pass
    return names


class ModelPane(VerticalScroll):
    """Model name (preset, hub id or folder), device, dtype, device map; then what was
    loaded."""

    def __init__(
        self, model: str, device: str, dtype: str | None, device_map: str | None = None
    ) -> None:
        super().__init__(id="model-pane")
        self.initial = (model, device if device in DEVICES else "auto", dtype or "auto")
        self.initial_map = device_map if device_map in DEVICE_MAP_STRATEGIES else NO_MAP

    def compose(self) -> ComposeResult:
        """The pane's widgets in screen order (long: a layout, read top to bottom)."""
        name, device, dtype = self.initial
        presets = ", ".join(preset_names(aliases=False))
        yield Static(
            "Choose a model: a preset (smollm2-135m runs offline on a CPU), a hub id or a "
            f"local folder, then F2 (or Load).\nPresets: {presets}",
            classes="pane-intro",
        )
        yield FormField(
            "Model",
            Input(
                value=name,
                placeholder="smollm2-135m, gpt2-xl, EleutherAI/gpt-j-6B, /path/to/model",
                suggester=SuggestFromList(preset_names(), case_sensitive=False),
                id="model-name",
                compact=True,
                tooltip="A preset name, a Hugging Face hub id or a local folder",
            ),
            key="model",
            id="ff-model",
        )
        yield FormField(
            "Device",
            Select(
                [(d, d) for d in DEVICES],
                value=device,
                allow_blank=False,
                id="model-device",
                compact=True,
                tooltip="auto: the GPU when there is one",
            ),
            key="device",
        )
        yield FormField(
            "Dtype",
            Select(
                [(d, d) for d in DTYPES],
                value=dtype if dtype in DTYPES else "auto",
                allow_blank=False,
                id="model-dtype",
                compact=True,
                tooltip="auto: float32 (the reference); bfloat16 halves the memory",
            ),
            key="dtype",
        )
        yield FormField(
            "Device map",
            Select(
                [(d, d) for d in DEVICE_MAPS],
                value=self.initial_map,
                allow_blank=False,
                id="model-device-map",
                compact=True,
                tooltip="Spread a model too large for one GPU over the GPUs (and CPU) "
                "through accelerate; none: the whole model on the device above",
            ),
            key="device_map",
        )
        with Horizontal(classes="buttons"):
            yield Button(
                "Load (F2)",
                id="btn-load",
                variant="primary",
                compact=True,
                action="app.load_model",
                tooltip="Load this model (replaces the loaded one)",
            )
            yield Button(
                "Prepare covariance",
                id="btn-prepare",
                compact=True,
                action="app.prepare_covariance",
                tooltip="Compute the covariance statistics for the layer now (cached after)",
            )
        yield Static(Text("No model loaded yet.", style="dim italic"), id="model-info")

    def values(self) -> tuple[str, str, str | None, str | None]:
        """(model, device, dtype or None, device map or None)."""
        name = self.query_one("#model-name", Input).value.strip()
        device = str(self.query_one("#model-device", Select).value)
        dtype = str(self.query_one("#model-dtype", Select).value)
        dmap = str(self.query_one("#model-device-map", Select).value)
        return name, device, None if dtype == "auto" else dtype, None if dmap == NO_MAP else dmap

    def set_error(self, message: str | None) -> None:
        self.query_one("#ff-model", FormField).set_error(message)

    def set_loading(self, loading: bool, text: str = "") -> None:
        info = self.query_one("#model-info", Static)
        if loading:
            info.update(Text(text or "Loading…", style="italic"))
        info.loading = loading

    def show_unloaded(self) -> None:
        """No model (a load failed or was cancelled before the model was in memory)."""
        self.set_loading(False)
        self.query_one("#model-info", Static).update("No model loaded.")

    def show_info(self, info: ModelInfo) -> None:
        t = Table.grid(padding=(0, 2))
        t.add_column(style="dim", no_wrap=True)
        t.add_column()
        t.add_row("model", Text(info.name, style="bold cyan"))
        t.add_row("source", info.source)
        t.add_row("device", f"{info.device} · {info.dtype}")
        mem = fbytes(info.memory_bytes) + " of weights"
        if info.gpu_memory_bytes is not None:
            mem += f" · GPU memory in use {fbytes(info.gpu_memory_bytes)}"
        t.add_row("memory", mem)
        t.add_row("layers", f"{info.n_layers} (edit layer {info.layer}: {info.weight_module})")
        t.add_row(
            "preset", f"key mode {info.default_mode}" + (f" · {info.notes}" if info.notes else "")
        )
        cov = Text(info.covariance, style="green" if info.covariance_ready else "yellow")
        t.add_row("covariance", cov)
        t.add_row("loaded in", fseconds(info.seconds))
        info_w = self.query_one("#model-info", Static)
        info_w.loading = False
        info_w.update(t)
