"""The torch.compile backend fastdit compiles with: inductor, with whole-row (persistent) reductions up to
16384 values.

A DiT row is 3072 values (12288 in the MLP). Inductor keeps a row in registers only up to 1024 values;
longer rows get a looped reduction that re-reads the row once per pass: LayerNorm statistics, then the
fp8 absmax, then the output. Widening the limit makes LayerNorm + modulate + fp8 quantization one read
of the row: on an H100 at 1024^2 with CFG, 0.1813 -> 0.1755 s/step with fp8 linears and
0.2467 -> 0.2448 s/step in bf16 (benchmarks/RESULTS.md). The override is scoped to fastdit's own graphs.
"""

from __future__ import annotations

import functools

from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V

PERSISTENT_ROW_LIMIT = 16384


class _WholeRowReductions(InductorChoices):
    @staticmethod
    def should_use_persistent_reduction(features, cooperative_reduction: bool) -> bool:
        if InductorChoices.should_use_persistent_reduction(features, cooperative_reduction):
            return True
        return features.get_reduction_hint() == ReductionHint.INNER and V.graph.sizevars.statically_known_leq(
            features.reduction_numel, PERSISTENT_ROW_LIMIT
        )


def _compile(gm, example_inputs, options: dict | None = None):
    from torch._inductor.compile_fx import compile_fx

    with V.set_choices_handler(_WholeRowReductions()):
        return compile_fx(gm, example_inputs, config_patches=options)


def backend(options: dict | None = None):
    """A torch.compile backend: inductor with `options` (inductor config patches) and whole-row reductions."""
    return functools.partial(_compile, options=options)
