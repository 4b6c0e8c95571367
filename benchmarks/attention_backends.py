"""Time fastdit's attention backends at the DiT's shape, and the options for a CFG batch whose two texts
differ in length (padding mask vs. one unmasked call per sample).

    python benchmarks/attention_backends.py [--tokens 4224] [--batch 2] [--heads 24]
"""

import argparse
import functools
import statistics

import torch

from fastdit.bench.timing import time_steps
from fastdit.kernels.attention import attention, available_backends


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096 + 128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--pad", type=int, default=100, help="padded text tokens of the second sample")
    a = p.parse_args()
    dev = torch.device("cuda")
    b, s, h, d = a.batch, a.tokens, a.heads, 128
    q, k, v = (torch.randn(b, s, h, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * b * s * s * h * d
    ref = attention(q, k, v, None, "sdpa").float()

    def report(name, fn, fl=flops):
        t = statistics.median(time_steps(fn, dev, warmup=5, iters=30))
        print(f"{name:40s} {t * 1e3:8.3f} ms {fl / t / 1e12:6.0f} TFLOP/s")

    for backend in available_backends(dev):
        if backend == "math":
            continue
        fn = functools.partial(attention, backend=backend)
        if backend in ("int8", "fp8"):  # as in the DiT: the quantization pre-pass compiled (fused) before the kernel
            fn = torch.compile(fn, fullgraph=True)
        out = fn(q, k, v, None).float()
        err = ((out - ref).norm() / ref.norm()).item()
        report(f"{backend} (no mask, err {err:.1e})", lambda f=fn: f(q, k, v, None))

    mask = torch.ones(b, s, dtype=torch.bool, device=dev)
    mask[1, 128 - a.pad : 128] = False  # second sample: shorter text, padded
    report("sdpa + key mask", lambda: attention(q, k, v, mask, "sdpa"))
    fmask = torch.zeros(b, 1, 1, s, device=dev, dtype=torch.bfloat16).masked_fill(~mask[:, None, None, :], -1e4)
    report(
        "sdpa + float bias",
        lambda: torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), fmask
        ),
    )

    keep = s - a.pad  # per-sample: sample 1 drops its padded keys (and queries)
    q1, k1, v1 = (torch.cat([x[1:2, : 128 - a.pad], x[1:2, 128:]], dim=1).contiguous() for x in (q, k, v))

    def split():
        attention(q[:1], k[:1], v[:1], None, "cudnn")
        attention(q1, k1, v1, None, "cudnn")

    report("cudnn, one call per sample", split, 4 * (s * s + keep * keep) * h * d)


if __name__ == "__main__":
    main()
