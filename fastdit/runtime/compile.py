"""Compiling the DiT: `compile_blocks` (regional compilation, one graph for every block) and the torch.compile
backend fastdit compiles with: inductor, with whole-row (persistent) reductions up to 16384 values.

A DiT row is 3072 values (12288 in the MLP). Inductor keeps a row in registers only up to 1024 values;
longer rows get a looped reduction that re-reads the row once per pass: LayerNorm statistics, then the
fp8 absmax, then the output. Widening the limit makes LayerNorm + modulate + fp8 quantization one read
of the row (measured in benchmarks/RESULTS.md). The override is scoped to fastdit's own graphs. Inductor is
imported when a graph is compiled, not with this module.
"""

from __future__ import annotations

import functools
import inspect

from torch import nn

PERSISTENT_ROW_LIMIT = 16384


@functools.cache
def _whole_row_choices():
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    class WholeRowReductions(InductorChoices):
        @staticmethod
        def should_use_persistent_reduction(features, cooperative_reduction: bool) -> bool:
            if InductorChoices.should_use_persistent_reduction(features, cooperative_reduction):
                return True
            return features.get_reduction_hint() == ReductionHint.INNER and V.graph.sizevars.statically_known_leq(
                features.reduction_numel, PERSISTENT_ROW_LIMIT
            )

    return WholeRowReductions()


def _compile(gm, example_inputs, options: dict | None = None):
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.virtualized import V

    with V.set_choices_handler(_whole_row_choices()):
        return compile_fx(gm, example_inputs, config_patches=options)


def backend(options: dict | None = None):
    """A torch.compile backend: inductor with `options` (inductor config patches) and whole-row reductions."""
    return functools.partial(_compile, options=options)


# The inputs of the compiled regions (`Block.forward`, `FinalLayer.forward` of fastdit.models.qwenimage, by their
# parameter names) whose sizes count tokens, with the dim that counts them (None: an int): the image and text
# streams' sequence dims, the RoPE tables, the key mask, the zero_cond_t token index, and each sample's valid text
# length.
TOKEN_DIMS: tuple[tuple[str, int | None], ...] = (
    (r"L\['(img|txt|x)'\]\.(x|update)", 1),
    (r"L\['rope'\]\.(cos|sin)", 0),
    (r"L\['key_mask'\]", 1),
    (r"L\['index'\]", 1),
    (r"L\['txt_lens'\]\[\d+\]", None),
)


@functools.cache
def _per_dim_entries() -> bool:
    """Whether this torch reads a `:N` suffix on a `dynamic_sources` entry as "dim N only" (torch 2.13 does). An
    older one takes the suffix as part of the pattern, which then matches nothing: the first compile would be
    static and the second size would recompile (seen on torch 2.11)."""
    from torch._dynamo.variables import builder

    return "dim" in inspect.signature(builder.is_dynamic_source).parameters


def token_dim_sources(per_dim: bool) -> str:
    """`torch.compiler.config.dynamic_sources` for TOKEN_DIMS. Without per-dim entries a tensor's every dim is
    made symbolic: its width and head sizes become static again at the first op that meets a weight (a guard that
    they equal it), the batch stays symbolic (a batch of 1 is still a graph of its own: sizes 0 and 1 are
    specialized)."""
    return ",".join(f"{p}:{d}" if per_dim and d is not None else p for p, d in TOKEN_DIMS)


def dynamic_tokens():
    """A context in which compiled DiT regions trace their token counts as symbolic: the first compile serves every
    image size, reference-image size and text length that follows, with no recompile. The other sizes (batch,
    width, heads) stay static (see `token_dim_sources` for torch releases before per-dim entries). Pipelines whose
    token counts change from call to call (editing: reference images and their text tokens) run the DiT inside it;
    outside a compile it does nothing but set a config value.

    Run the DiT under torch.inference_mode, as the pipelines do: there no tensor is a view of another, while under
    no_grad the first block's input is a view of the embedding GEMM's output (the later blocks' are not), and
    symbolic shapes guard on a view's base: the first block would get a graph of its own."""
    import torch.compiler.config

    return torch.compiler.config.patch(dynamic_sources=token_dim_sources(_per_dim_entries()))


def compile_blocks(model: nn.Module, **compile_kwargs) -> nn.Module:
    """Regional compilation: compile one block's code, reused by every block (warm-up of one, not 60).

    `model` is a DiT or a fastdit.parallel wrapper of one (`model.base` holds the blocks). `compile_kwargs` go to
    torch.compile; the default backend is this module's (inductor with whole-row reductions), to which `options`
    (inductor config patches) are passed.
    """
    compile_kwargs.setdefault("fullgraph", True)
    if "backend" not in compile_kwargs:
        compile_kwargs["backend"] = backend(compile_kwargs.pop("options", None))
    base = model.base
    for block in base.blocks:
        block.compile(**compile_kwargs)
    base.final.compile(**compile_kwargs)
    return model
