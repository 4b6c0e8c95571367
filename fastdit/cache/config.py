"""What a step cache does, as plain values: `StepCache`, its compact text form, and fixed schedules.

This module imports no torch: the command line parses `--cache` and `--cache-schedule` with it.

    StepCache(front_blocks=8, back_blocks=0, threshold=0.12, warmup_steps=8, max_cached_steps=-1,
              max_consecutive_cached=-1, taylor_order=0, schedule=None)

Text form (`--cache`): comma-separated settings, each optional, e.g. `F8B0,threshold=0.12,warmup=8,taylor=1`:

    F<n>B<m>            front_blocks=n, back_blocks=m (`F<n>` alone keeps back_blocks)
    threshold=X         relative L1 change of the front blocks' residual below which a step reuses the cache
                        (0: never; inf: always, within the caps)
    warmup=N            steps 0 .. N-1 always compute
    taylor=K            extrapolate the cached residual from the last K + 1 computed steps (0: reuse as is)
    max-cached=N        at most N cached steps per call (-1: no limit)
    max-consecutive=N   at most N cached steps in a row (-1: no limit)
    default             the defaults above (DBCache F8B0)

Fixed schedule (`--cache-schedule`, cache-dit's steps_computation_mask): comma-separated phrases, in order,
`compute N`, `cache N`, and last `then every K` / `then every Kth` (from there on, of each K steps the last
computes: `every 2nd` = cache, compute, cache, ...); steps after the phrases compute. Or the mask itself, one
digit per step: `11111111010101...` (1 computes). Over 50 steps `compute 4, then every 2nd` caches 23.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from fastdit.errors import ConfigError

_INT_FIELDS = {  # field -> smallest value
    "front_blocks": 1,
    "back_blocks": 0,
    "warmup_steps": 0,
    "max_cached_steps": -1,
    "max_consecutive_cached": -1,
    "taylor_order": 0,
}
# text-form key -> StepCache field
_KEYS = {
    "threshold": "threshold",
    "warmup": "warmup_steps",
    "taylor": "taylor_order",
    "max-cached": "max_cached_steps",
    "max-consecutive": "max_consecutive_cached",
}
_FB = re.compile(r"^f(\d+)(?:b(\d+))?$", re.IGNORECASE)


@dataclass(frozen=True)
class StepCache:
    """Skip the middle blocks of a denoising step when the first blocks' output barely changed since the last
    computed step, adding the middle blocks' residual of that step instead (DBCache; `front_blocks=1,
    back_blocks=0` is First-Block Cache). See fastdit.cache.loop for the algorithm.

    `front_blocks` run every step and measure the change; the last `back_blocks` run every step after the middle.
    A step is cached when its index is >= `warmup_steps`, the relative L1 change is below `threshold`, and the caps
    allow (`max_cached_steps` per call, `max_consecutive_cached` in a row; -1: none). `taylor_order` K > 0
    extrapolates the cached residual with the polynomial through the last K + 1 computed steps (TaylorSeer).
    `schedule`: one entry per step (true: compute), fixed in advance; then threshold, warm-up and caps are unused.
    """

    front_blocks: int = 8
    back_blocks: int = 0
    threshold: float = 0.12
    warmup_steps: int = 8
    max_cached_steps: int = -1
    max_consecutive_cached: int = -1
    taylor_order: int = 0
    schedule: tuple[bool, ...] | None = None

    def __post_init__(self):
        for name, low in _INT_FIELDS.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"StepCache.{name} must be an integer >= {low}, got {v!r}")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, int | float) or math.isnan(t) or t < 0:
            raise ConfigError(f"StepCache.threshold must be a number >= 0 (inf: always cache), got {t!r}")
        if self.schedule is not None:
            s = self.schedule
            if isinstance(s, str) or not isinstance(s, Sequence) or not s or any(v not in (0, 1) for v in s):
                raise ConfigError(f"StepCache.schedule must be a non-empty sequence of 0/1 or booleans, got {s!r}")
            if not s[0]:
                raise ConfigError("StepCache.schedule must compute step 0: there is nothing to reuse before it")
            object.__setattr__(self, "schedule", tuple(bool(v) for v in s))

    @property
    def measures(self) -> bool:
        """Whether some decision depends on the measured change (else no statistic is computed at all)."""
        return self.schedule is None and 0 < self.threshold < math.inf

    def check_fits(self, num_layers: int) -> None:
        """ConfigError unless the front and back blocks leave at least one of the model's blocks to cache."""
        if self.front_blocks + self.back_blocks >= num_layers:
            raise ConfigError(
                f"StepCache.front_blocks={self.front_blocks} + back_blocks={self.back_blocks} must leave at least "
                f"one of the model's {num_layers} blocks to cache: make their sum < {num_layers}"
            )

    def check_steps(self, steps: int) -> None:
        if self.schedule is not None and len(self.schedule) != steps:
            raise ConfigError(f"StepCache.schedule has {len(self.schedule)} entries, but the call runs {steps} steps")

    @classmethod
    def parse(cls, spec: str) -> StepCache:
        """The text form (module docstring) -> a StepCache; ConfigError naming the setting to fix."""
        values: dict = {}
        items = [item.strip() for item in str(spec).split(",")]
        if not all(items):
            raise ConfigError(f"empty cache setting in {spec!r}: give e.g. F8B0,threshold=0.12 or 'default'")
        for item in items:
            fb = _FB.match(item)
            if item.lower() == "default":
                continue
            if fb:
                values["front_blocks"] = int(fb.group(1))
                if fb.group(2) is not None:
                    values["back_blocks"] = int(fb.group(2))
                continue
            key, sep, text = item.partition("=")
            key = key.strip().lower().replace("_", "-")
            if not sep or key not in _KEYS:
                raise ConfigError(
                    f"cache setting {item!r} is not one of F<front>B<back>, {', '.join(k + '=' for k in _KEYS)} "
                    "or default"
                )
            try:
                values[_KEYS[key]] = float(text) if key == "threshold" else int(text)
            except ValueError:
                kind = "a number" if key == "threshold" else "an integer"
                raise ConfigError(f"cache setting {key}={text!r}: the value must be {kind}") from None
        return cls(**values)

    def spec(self) -> str:
        """The text form of this cache (`parse` reads it back, but for a schedule, written as its 0/1 mask)."""
        values = [f"F{self.front_blocks}B{self.back_blocks}"]
        values += [f"{key}={getattr(self, name):g}" for key, name in _KEYS.items()]
        if self.schedule is not None:
            values.append("schedule=" + "".join("1" if v else "0" for v in self.schedule))
        return ",".join(values)


def parse_schedule(text: str, steps: int) -> tuple[bool, ...]:
    """A fixed schedule (module docstring) over `steps` steps -> one bool per step (true: compute)."""
    text = text.strip()
    if text and set(text) <= {"0", "1"}:
        if len(text) != steps:
            raise ConfigError(f"cache schedule {text!r} has {len(text)} digits for {steps} steps")
        return tuple(c == "1" for c in text)
    mask: list[bool] = []
    phrases = [p.strip().lower() for p in text.split(",")]
    for n, phrase in enumerate(phrases):
        words = phrase.split()
        if words[:1] == ["then"]:
            words = words[1:]
        every = re.fullmatch(r"(\d+)(?:st|nd|rd|th)?", words[1]) if len(words) == 2 and words[0] == "every" else None
        if every and n == len(phrases) - 1 and int(every.group(1)) >= 1:
            k = int(every.group(1))
            mask += [(j + 1) % k == 0 for j in range(max(0, steps - len(mask)))]
            continue
        if len(words) == 2 and words[0] in ("compute", "cache") and words[1].isdigit():
            mask += [words[0] == "compute"] * int(words[1])
            continue
        raise ConfigError(
            f"cache schedule phrase {phrase!r}: use 'compute N', 'cache N' and last 'then every K' "
            "(e.g. 'compute 8, then every 2nd'), or a mask of 0/1 digits, one per step"
        )
    if len(mask) > steps:
        raise ConfigError(f"cache schedule {text!r} covers {len(mask)} steps, but the run has {steps}")
    mask += [True] * (steps - len(mask))
    if not mask[0]:
        raise ConfigError(f"cache schedule {text!r} must compute step 0")
    return tuple(mask)
