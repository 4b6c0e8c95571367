"""The LoRA methods every fastdit pipeline has (`fastdit.pipelines.base.DiTPipeline` inherits them).

    pipe.load_lora("style.safetensors", adapter_name="style", scale=0.8)   # read, check, activate (dynamic)
    pipe.set_loras({"style": 0.8, "detail": 0.5})   # the active set; adapters not named go inactive
    pipe.fuse_loras()                               # merge the active set into the weights: no per-step cost
    pipe.unload_loras()                             # every adapter gone, the base weights back bit for bit

Dynamic adapters run as side GEMMs whose factors are inputs of the compiled graph (fastdit.lora.layer), so a
server switches sets per request with `set_loras` without recompiling. The pipeline's CUDA graph is keyed by
the LoRA layout as well as by the step's shapes (`lora_graph_key`).
"""

from __future__ import annotations

from collections.abc import Mapping

from fastdit.lora.model import DiTLoras, LoraSource, check_scale


class LoraPipelineMixin:
    """LoRA adapters on `self.transformer` (see the module docstring); needs `transformer` and `dtype`."""

    _dit_loras: DiTLoras | None = None

    def _loras(self) -> DiTLoras:
        if self._dit_loras is None:
            self._dit_loras = DiTLoras(self.transformer, self.dtype)
        return self._dit_loras

    def load_lora(self, lora: LoraSource, adapter_name: str | None = None, scale: float = 1.0) -> str:
        """Load a LoRA (a .safetensors path, a state dict in any supported layout, or `read_lora`'s result) and add
        it to the active set at `scale`; returns its name (default: the file's stem). Raises LoraError, changing
        nothing, if it cannot be read or does not fit the DiT."""
        scale = check_scale(scale, "load_lora")
        loras = self._loras()
        name = loras.load(lora, adapter_name)
        loras.activate({**loras.scales, name: scale})
        return name

    def set_loras(self, scales: Mapping[str, float]) -> None:
        """Make `scales` ({adapter_name: scale}) the active set (unmerged); `{}` turns every adapter off."""
        if self._dit_loras is None and not scales:
            return
        self._loras().activate(scales)

    def fuse_loras(self) -> None:
        """Merge the active adapters into the DiT's weights (fp8 layers: dequantized, merged in float32,
        quantized again); the base weights are kept in host memory for `unload_loras`."""
        self._loras().fuse()

    def unload_loras(self) -> None:
        """Remove every adapter and put the base weights back exactly (merged ones included)."""
        if self._dit_loras is not None:
            self._dit_loras.unload()
            self._dit_loras = None

    def lora_adapters(self) -> list[dict]:
        """The loaded adapters: name, source, rank, layers, active scale (None: inactive), fused scale."""
        return [] if self._dit_loras is None else self._dit_loras.describe()

    def lora_graph_key(self) -> tuple:
        """What a CUDA graph of the DiT step depends on beyond its shapes: which layers run side GEMMs, and their
        rank capacity (not the factors or scales, which the graph reads from its buffers)."""
        return () if self._dit_loras is None else self._dit_loras.layout_key()
