"""Qwen-Image 2.1's token layout: where each prefix token comes from and its 3-axis RoPE position.

Pure functions of the prompt's vision-slot mask and the image grids (host ints), computed once per image outside
the compiled blocks; fastdit.models.qwenimage21 turns the positions into RoPE tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from fastdit.errors import ConfigError

LATENTS_PER_SLOT = 4  # one vision slot of the text encoder = a 2x2 group of latent tokens


class Segment(NamedTuple):
    """A run of prefix tokens [start, end): text (grid None, causal) or one image block (grid (h, w))."""

    start: int
    end: int
    grid: tuple[int, int] | None


class PrefixLayout(NamedTuple):
    """Where each prefix token comes from; one layout serves a batch (samples differ only in text padding)."""

    source: tuple[int, ...]  # (P,) row of each prefix token in [text (T rows); condition-image tokens]
    segments: tuple[Segment, ...]
    num_text: int  # T, the text encoder's sequence length (vision slots included)


def prefix_layout(slot_mask: Sequence[bool], cond_grids: Sequence[tuple[int, int]] = ()) -> PrefixLayout:
    """The prefix of a prompt whose text-encoder positions `slot_mask` (T,) are True at vision slots, filled in
    order by condition images of `cond_grids` (h, w) latent tokens each; an image fills h * w / 4 slots of one
    run. Text rows at slot positions are dropped, each slot becomes 4 latent tokens in row-major order."""
    slots = [bool(s) for s in slot_mask]
    grids = [tuple(int(v) for v in g) for g in cond_grids]
    if not slots:
        raise ConfigError("the prompt has no tokens: slot_mask is empty")
    if any(len(g) != 2 or min(g) < 1 for g in grids):
        raise ConfigError(f"cond_grids must be (height, width) in latent tokens, got {list(cond_grids)!r}")
    source: list[int] = []
    segments: list[Segment] = []
    row, image, i = len(slots), 0, 0  # next condition-token row, next image, next text position
    while i < len(slots):
        j = i
        while j < len(slots) and slots[j] == slots[i]:
            j += 1
        if not slots[i]:
            segments.append(Segment(len(source), len(source) + j - i, None))
            source.extend(range(i, j))
            i = j
            continue
        tokens = LATENTS_PER_SLOT * (j - i)  # the run's latent tokens, filled by whole images in order
        while tokens > 0:
            if image == len(grids) or grids[image][0] * grids[image][1] > tokens:
                raise ConfigError(
                    f"the vision slots at text positions {i}..{j - 1} ({(j - i) * LATENTS_PER_SLOT} latent tokens) "
                    f"do not match cond_grids {grids}: each image needs h * w / {LATENTS_PER_SLOT} slots of one run"
                )
            n = grids[image][0] * grids[image][1]
            segments.append(Segment(len(source), len(source) + n, grids[image]))
            source.extend(range(row, row + n))
            row, image, tokens = row + n, image + 1, tokens - n
        i = j
    if image != len(grids):
        raise ConfigError(f"{len(grids)} condition images given but the prompt has vision slots for {image}")
    return PrefixLayout(tuple(source), tuple(segments), len(slots))


def _grid(frame: int, h: int, w: int) -> Tensor:
    rows = torch.arange(-(h - h // 2), h // 2).repeat_interleave(w)
    cols = torch.arange(-(w - w // 2), w // 2).repeat(h)
    return torch.stack([torch.full_like(rows, frame), rows, cols], dim=1)  # (h * w, 3)


def rope_positions(layout: PrefixLayout, grid: tuple[int, int]) -> Tensor:
    """(P + N, 3) integer (frame, row, col) positions of [prefix; noise image of `grid` (h, w)]."""
    parts, pos = [], 0
    for seg in layout.segments:
        if seg.grid is None:
            parts.append(torch.arange(pos, pos + seg.end - seg.start)[:, None].expand(-1, 3))
            pos += seg.end - seg.start
        else:
            parts.append(_grid(pos, *seg.grid))
            pos += max(seg.grid)
    return torch.cat([*parts, _grid(pos, *grid)])
