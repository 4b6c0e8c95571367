"""Running a Triton kernel under Triton's interpreter on the CPU, in a subprocess (TRITON_INTERPRET must be set
before Triton is imported), with two fixes for Triton 3.6's interpreter applied first (`FIXES`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

FIXES = r"""
import numpy as np
import triton.runtime.interpreter as ti

# (1) With numpy >= 2.3 the interpreter's int() of a scalar kernel argument fails: give its tensors __index__.
if hasattr(ti, "_patch_lang_tensor"):
    _patch_lang_tensor = ti._patch_lang_tensor

    def _patched(tensor, scope):
        _patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    ti._patch_lang_tensor = _patched

import torch
import triton.language as tl

# (2) The interpreter rounds float32 -> e4m3 wrongly when the mantissa rounds up into the exponent (31.1 -> 16,
# not 32): use torch's conversion (round to nearest even, as the GPU's cvt.rn) for a kernel's e4m3 values.
FP8_FIXED = hasattr(ti, "_convert_float")
if FP8_FIXED:
    _convert_float = ti._convert_float

    def _convert(input, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.float8e4nv:
            x = torch.from_numpy(np.ascontiguousarray(input).view(np.float32))
            return x.to(torch.float8_e4m3fn).view(torch.uint8).numpy().reshape(input.shape)
        return _convert_float(input, input_dtype, output_dtype, rounding_mode)

    ti._convert_float = _convert
"""


def run_interpreted(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -c FIXES + script *args` with TRITON_INTERPRET=1 and the repository importable."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", FIXES + script, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=timeout,
    )
