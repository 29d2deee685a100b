"""Known Apple chips: memory bandwidth, GPU TFLOPS and memory sizes, by name.

A cluster file's node can be a machine that was never profiled: ``"chip": "M4 Pro 48GB"``
(or ``"m4-pro-48gb"``, ``"Apple M4 Max 40c 128GB"``). `lookup(text)` turns that into a
`ChipSpec` (one chip variant with one memory size); graphsplit.roofline derives its cost table.

Where the numbers come from:

* ``bandwidth_gbs``: Apple's published unified-memory bandwidth for the chip (the figures
  users know: M1 Max 400, M2 Ultra 800, M3 Ultra 819, M4 Pro 273, M4 Max 410 / 546 GB/s).
  The physical peak (transfer rate x bus width) is up to 2.4% higher where Apple rounds down
  (M1/M2/M3 Max: LPDDR5-6400 x 512 bit = 409.6 GB/s).
* ``fp16_tflops``: GPU cores x 128 FP32 ALUs x 2 (fused multiply-add) x GPU clock; Apple GPUs
  run FP16 at the FP32 rate. This reproduces every figure Apple published (M1 2.6, M1 Pro 5.2,
  M1 Max 10.4, M1 Ultra 21, M2 3.6, M2 Pro 6.8, M2 Max 13.6, M2 Ultra 27.2 TFLOPS; tested).
  Clocks: M1 1.278 GHz and M2 1.398 GHz (those published figures); M3 1.398 GHz and M4 Max
  1.678 GHz, M4 1.470 GHz (hmc-tech.com's GPU pages); M4 Pro assumed at the M4 Max's clock.
* ``memory_gb``: the unified-memory sizes Apple sold with that GPU variant.

`usable_bytes(total)` is the memory Metal lets the GPU wire by default
(``recommendedMaxWorkingSetSize``): 2/3 of a machine up to 36 GB (10.67 of 16 GB measured on an
M4, exo-explore/exo#1672), 0.84 above (107.52 of 128 GiB measured on two machines,
antirez/ds4#893). ``sudo sysctl iogpu.wired_limit_mb`` raises it; give the node
``memory_bytes`` then.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from profiler.errors import UserError

GB = 1 << 30  # Apple's "GB" of unified memory are binary (a 48GB machine has 48 GiB)
ALUS_PER_CORE = 128
CLOCK_GHZ = {"M1": 1.278, "M2": 1.398, "M3": 1.398, "M4": 1.470, "M4 Pro": 1.678,
             "M4 Max": 1.678}
SMALL_MACHINE_BYTES = 36 * GB
SMALL_USABLE, LARGE_USABLE = 2 / 3, 0.84


class ChipError(UserError):
    """An unknown chip name or a memory size the chip was not sold with."""


@dataclass(frozen=True)
class Chip:
    """One GPU variant of an Apple chip (e.g. M4 Max with the 40-core GPU)."""

    family: str  # "M4 Max"
    gpu_cores: int
    bandwidth_gbs: float  # Apple's published figure
    memory_gb: tuple[int, ...]  # sizes sold with this variant

    @property
    def generation(self) -> int:
        return int(self.family.split()[0][1:])

    @property
    def fp16_tflops(self) -> float:
        clock = CLOCK_GHZ.get(self.family, CLOCK_GHZ[self.family.split()[0]])
        return self.gpu_cores * ALUS_PER_CORE * 2 * clock / 1000.0


@dataclass(frozen=True)
class ChipSpec:
    """A chip variant with one memory size: what a node of a cluster is."""

    chip: Chip
    memory_gb: int

    @property
    def name(self) -> str:
        return f"Apple {self.chip.family} ({self.chip.gpu_cores}-core GPU, {self.memory_gb} GB)"

    @property
    def slug(self) -> str:
        return f"{self.chip.family.lower().replace(' ', '-')}-{self.memory_gb}gb"

    @property
    def memory_bytes(self) -> int:
        return self.memory_gb * GB

    @property
    def bandwidth_gbs(self) -> float:
        return self.chip.bandwidth_gbs

    @property
    def fp16_tflops(self) -> float:
        return self.chip.fp16_tflops


def _v(family: str, bandwidth: float, variants: dict[int, tuple[int, ...]]) -> list[Chip]:
    return [Chip(family, cores, bandwidth, mem) for cores, mem in variants.items()]


CHIPS: tuple[Chip, ...] = tuple(
    _v("M1", 68.25, {7: (8, 16), 8: (8, 16)})
    + _v("M1 Pro", 200, {14: (16, 32), 16: (16, 32)})
    + _v("M1 Max", 400, {24: (32, 64), 32: (32, 64)})
    + _v("M1 Ultra", 800, {48: (64, 128), 64: (64, 128)})
    + _v("M2", 100, {8: (8, 16, 24), 10: (8, 16, 24)})
    + _v("M2 Pro", 200, {16: (16, 32), 19: (16, 32)})
    + _v("M2 Max", 400, {30: (32, 64, 96), 38: (32, 64, 96)})
    + _v("M2 Ultra", 800, {60: (64, 128, 192), 76: (64, 128, 192)})
    + _v("M3", 100, {8: (8, 16, 24), 10: (8, 16, 24)})
    + _v("M3 Pro", 150, {14: (18, 36), 18: (18, 36)})
    + _v("M3 Max", 300, {30: (36, 96)}) + _v("M3 Max", 400, {40: (48, 64, 128)})
    + _v("M3 Ultra", 819, {60: (96, 256), 80: (96, 256, 512)})
    + _v("M4", 120, {8: (16, 24, 32), 10: (16, 24, 32)})
    + _v("M4 Pro", 273, {16: (24, 48, 64), 20: (24, 48, 64)})
    + _v("M4 Max", 410, {32: (36,)}) + _v("M4 Max", 546, {40: (48, 64, 128)}))

FAMILIES = tuple(dict.fromkeys(c.family for c in CHIPS))


def usable_bytes(total_bytes: int) -> int:
    """Metal's default GPU working set for a machine of `total_bytes` (see the module docstring)."""
    share = SMALL_USABLE if total_bytes <= SMALL_MACHINE_BYTES else LARGE_USABLE
    return int(total_bytes * share)


def all_specs() -> list[ChipSpec]:
    return [ChipSpec(c, m) for c in CHIPS for m in c.memory_gb]


def _names() -> list[str]:
    """Every spelling `lookup` suggests: 'M4 Pro 48GB', ... (largest GPU per memory size)."""
    return sorted({f"{s.chip.family} {s.memory_gb}GB" for s in all_specs()},
                  key=lambda n: (n.split()[0], n))


def _parse(text: str) -> tuple[str | None, int | None, int | None]:
    """(family, GPU cores, memory GB) from free text; family None when not recognised."""
    t = re.sub(r"[-_(),/]+", " ", str(text).lower()).replace("apple", " ")
    mem = cores = None
    m = re.search(r"(\d+)\s*gb\b", t)
    if m:
        mem, t = int(m.group(1)), t[:m.start()] + " " + t[m.end():]
    m = re.search(r"\b(\d+)\s*(?:c|cores?)(?:\s*gpu)?\b", t)
    if m:
        cores, t = int(m.group(1)), t[:m.start()] + " " + t[m.end():]
    m = re.fullmatch(r"\s*m\s*(\d)\s*(pro|max|ultra)?\s*", t)
    if not m:
        return None, cores, mem
    family = f"M{m.group(1)}" + (f" {m.group(2).capitalize()}" if m.group(2) else "")
    return (family if family in FAMILIES else None), cores, mem


def _close(text: str) -> str:
    names = _names()
    key = re.sub(r"[-_ ]+", " ", str(text).lower())
    close = difflib.get_close_matches(key, [n.lower() for n in names], n=4, cutoff=0.4)
    shown = [next(n for n in names if n.lower() == c) for c in close]
    return ", ".join(shown) if shown else ", ".join(FAMILIES)


def _shown(v) -> str:
    """A user's value on one line, cut to 40 characters."""
    t = str(v).replace("\n", " ")
    return repr(t if len(t) <= 40 else t[:40] + f"... ({len(t)} characters)")


def lookup(text: str) -> ChipSpec:
    """The chip a name means: "M4 Pro 48GB", "m4-pro-48gb", "M4 Max 40c 128GB", ...

    The memory size picks the GPU variant where it decides (M4 Max 36GB: 32 cores, 410 GB/s);
    where both variants were sold with that size the larger GPU is taken (write the cores,
    e.g. "M1 Max 24c 32GB", for the other). Raises ChipError (one line, with close matches)."""
    family, cores, mem = _parse(text)
    if family is None:
        raise ChipError(f"unknown chip {_shown(text)}; close matches: {_close(text)} "
                        "(known: Apple M1-M4, Pro/Max/Ultra; graphsplit/chips.py)")
    variants = [c for c in CHIPS if c.family == family]
    sizes = sorted({m for c in variants for m in c.memory_gb})
    if cores is not None:
        variants = [c for c in variants if c.gpu_cores == cores]
        if not variants:
            known = sorted({c.gpu_cores for c in CHIPS if c.family == family})
            raise ChipError(f"chip {_shown(text)}: the {family} has a "
                            f"{' or '.join(map(str, known))}-core GPU, not {_shown(cores)[1:-1]}")
    if mem is None:
        raise ChipError(f"chip {_shown(text)}: give its memory, e.g. '{family} {sizes[-1]}GB' (the "
                        f"{family} was sold with {', '.join(map(str, sizes))} GB)")
    fit = [c for c in variants if mem in c.memory_gb]
    if not fit:
        have = sorted({m for c in variants for m in c.memory_gb})
        raise ChipError(f"chip {_shown(text)}: the {family}{f' {cores}c' if cores else ''} was "
                        f"sold with {', '.join(map(str, have))} GB, not {_shown(mem)[1:-1]}; "
                        "pick one of those")
    return ChipSpec(max(fit, key=lambda c: c.gpu_cores), mem)
