"""The catalog of what the sweep can measure: timm ImageNet models, from timm's published result tables.

A **unit** is one (architecture, input size): the network the GPU runs. Several pretrained weights share a unit
(``resnet50.a1_in1k`` and ``resnet50.tv_in1k`` cost the same energy per image) and all of their accuracies stay
attached to it, so a measurement is taken once per unit and joined with every weight's accuracy later.

The tables ship as package data (``sweep/data/``, copied unchanged from timm's ``results/`` folder, Apache-2.0; see
the README there): ``results-imagenet.csv`` names weights ``architecture.tag`` at the size they were evaluated at;
the two RTX 5090 benchmark tables (eager and ``torch.compile``) name architectures, one row per input size, with
the parameter count, GMACs and activations; ``model_metadata-in1k.csv`` gives the pretraining data of timm's
legacy (pre-0.9, one weight per name) architectures.

The sweep measures the units that have an ImageNet result, at the size of that result. Units that only the
benchmark tables know (architectures without ImageNet classifier weights, or other input sizes) stay in the
catalog with no weights: ``get`` finds them and an explicit name selects them, but presets and filters skip them.
"""

from __future__ import annotations

import csv
import difflib
import fnmatch
import functools
import io
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import WattscopeError

RESULTS_FILE = "results-imagenet.csv"
BENCHMARK_FILE = "benchmark-infer-amp-nchw-pt291-cu130-5090.csv"
BENCHMARK_COMPILED_FILE = "benchmark-infer-amp-nchw-pt291-cu130-5090-dynamo.csv"
METADATA_FILE = "model_metadata-in1k.csv"
# Where the tables come from; the store records it so a results file says which catalog chose its units.
SOURCE = "timm results/ at huggingface/pytorch-image-models@aa4b5850c1543fa488abf260f18390eda46cf85d"

# The quick preset: how many units, and the compute cap that keeps it near 10 minutes on an H100.
QUICK_SIZE = 30
QUICK_MAX_IMG_SIZE = 288
QUICK_MAX_GMACS = 50.0
QUICK_PARAM_BINS = 5


class UnknownModelError(WattscopeError, ValueError):
    """A model name (architecture, weight or unit) that the catalog does not know."""


@dataclass(frozen=True)
class Weight:
    """One pretrained weight of a unit, with its ImageNet-1k validation accuracy at the unit's input size.

    ``pretrain`` is the pretraining data (``in1k``, ``in21k``, ``jft300m-ns``, ...) where timm's metadata says it
    unambiguously (see ``Catalog.from_tables``), else None.
    """

    name: str  # "architecture.tag"
    top1: float  # %
    top5: float  # %
    crop_pct: float | None
    interpolation: str | None
    pretrain: str | None


@dataclass(frozen=True)
class Unit:
    """One network at one input size: what the sweep measures once. Benchmark figures are timm's, on an RTX 5090
    with AMP (images/s at ``rtx5090_batch_size``), for comparison and for ordering work; they are not wattscope's."""

    architecture: str
    img_size: int  # px, square input
    family: str
    param_count_m: float | None
    gmacs: float | None  # per image
    macts_m: float | None  # activations per image, millions
    rtx5090_images_per_s: float | None
    rtx5090_compiled_images_per_s: float | None
    rtx5090_batch_size: int | None
    weights: tuple[Weight, ...]  # by top1, best first; empty when the unit has no ImageNet result

    @property
    def key(self) -> str:
        return f"{self.architecture}@{self.img_size}"

    @property
    def best_top1(self) -> float | None:
        return self.weights[0].top1 if self.weights else None


# Leading name parts that say where weights came from or add a block variant to another family's network, rather
# than naming a family: "tf_efficientnet_b0" is an EfficientNet, "dm_nfnet_f0" an NFNet, "wide_resnet50_2" a ResNet.
_MODIFIER_PREFIXES = frozenset({"tf", "dm", "gluon", "legacy", "tv", "eca", "gc", "ese", "nf", "wide"})
# Families whose name is two parts, where the first part alone would name another family or nothing useful.
_TWO_PART_FAMILIES = frozenset({"tiny_vit", "inception_next", "inception_resnet"})
_STEM = re.compile(r"[a-z]+(?:\d[a-z]+)*")
_VERSION = re.compile(r"\d+")


def family_of(architecture: str) -> str:
    """The family of an architecture name, by a fixed rule on the name alone.

    Take the first ``_``-separated part (skipping one modifier prefix such as ``tf``, ``dm``, ``legacy``, ``eca``,
    ``wide``; keeping ``tiny_vit``, ``inception_next`` and ``inception_resnet`` whole), then its leading
    alphabetic stem: letters, letter runs joined by a single digit (``res2net``, ``cs3darknet``), and a trailing
    version ``v<digits>``, which timm uses for a distinct design (``resnetv2``, ``mobilenetv3``, ``convnextv2``).
    Depth and width digits and variant letters after the stem are dropped: ``resnet50d`` -> ``resnet``,
    ``vit_base_patch16_224`` -> ``vit``, ``efficientnet_b0`` -> ``efficientnet``, ``tf_efficientnet_b0`` ->
    ``efficientnet``, ``convnext_tiny`` -> ``convnext``, ``eva02_base_patch14_448`` -> ``eva``.
    """
    parts = architecture.lower().split("_")
    if len(parts) > 1 and parts[0] in _MODIFIER_PREFIXES:
        parts = parts[1:]
    if len(parts) > 1 and f"{parts[0]}_{parts[1]}" in _TWO_PART_FAMILIES:
        return f"{parts[0]}_{parts[1]}"
    m = _STEM.match(parts[0])
    if m is None:
        return parts[0]
    stem = m.group(0)
    version = _VERSION.match(parts[0], len(stem)) if stem.endswith("v") else None
    return stem + version.group(0) if version else stem


@dataclass(frozen=True)
class Preset:
    """A named selection of units: ``rule`` picks them from a catalog."""

    name: str
    description: str
    rule: Callable[[Catalog], list[Unit]]


class Catalog:
    """Every unit, in a fixed order (by architecture, then input size), with lookups by name."""

    def __init__(self, units: Iterable[Unit], source: str = "") -> None:
        self.units: tuple[Unit, ...] = tuple(sorted(units, key=lambda u: (u.architecture, u.img_size)))
        self.source = source
        self._by_key = {u.key: u for u in self.units}
        if len(self._by_key) != len(self.units):
            raise ValueError("two units share an (architecture, img_size)")
        self._by_arch: dict[str, list[Unit]] = defaultdict(list)
        self._weight_units: dict[str, list[Unit]] = defaultdict(list)
        for u in self.units:
            self._by_arch[u.architecture].append(u)
            for w in u.weights:
                self._weight_units[w.name].append(u)

    @classmethod
    def load(cls) -> Catalog:
        """The catalog built from the tables shipped with wattscope (parsed once per process)."""
        return _load_packaged()

    @classmethod
    def from_tables(
        cls, results: str, benchmark: str, benchmark_compiled: str, metadata: str, source: str = ""
    ) -> Catalog:
        """Build a catalog from the text of timm's four tables.

        Units are the union of the (architecture, img_size) pairs of the results and of the eager benchmark. The
        parameter count is the benchmark's (it goes with its GMACs), else the results'. A weight's ``pretrain``
        comes from the metadata table only when its architecture has a single weight tag in the results: the
        metadata names legacy architectures, each of which had one weight, and with several tags nothing says
        which of them that was.
        """
        pretrain_of = {r["model"]: r["pretrain"] or None for r in _rows(metadata)}
        result_rows = _rows(results)
        tags: dict[str, set[str]] = defaultdict(set)
        for r in result_rows:
            arch, _, tag = r["model"].partition(".")
            tags[arch].add(tag)
        weights: dict[tuple[str, int], list[Weight]] = defaultdict(list)
        result_params_m: dict[tuple[str, int], float | None] = {}
        for r in result_rows:
            arch = r["model"].partition(".")[0]
            result_params_m.setdefault((arch, int(r["img_size"])), _number(r.get("param_count")))
            weights[(arch, int(r["img_size"]))].append(
                Weight(
                    name=r["model"],
                    top1=float(r["top1"]),
                    top5=float(r["top5"]),
                    crop_pct=_number(r.get("crop_pct")),
                    interpolation=r.get("interpolation") or None,
                    pretrain=pretrain_of.get(arch) if len(tags[arch]) == 1 else None,
                )
            )
        bench = {(r["model"], int(r["infer_img_size"])): r for r in _rows(benchmark)}
        compiled = {(r["model"], int(r["infer_img_size"])): r for r in _rows(benchmark_compiled)}
        units = []
        for arch, img_size in sorted(set(weights) | set(bench)):
            b = bench.get((arch, img_size), {})
            c = compiled.get((arch, img_size), {})
            batch = _number(b.get("infer_batch_size"))
            params_m = _number(b.get("param_count"))
            units.append(
                Unit(
                    architecture=arch,
                    img_size=img_size,
                    family=family_of(arch),
                    param_count_m=params_m if params_m is not None else result_params_m.get((arch, img_size)),
                    gmacs=_number(b.get("infer_gmacs")),
                    macts_m=_number(b.get("infer_macts")),
                    rtx5090_images_per_s=_number(b.get("infer_samples_per_sec")),
                    rtx5090_compiled_images_per_s=_number(c.get("infer_samples_per_sec")),
                    rtx5090_batch_size=None if batch is None else int(batch),
                    weights=tuple(sorted(weights.get((arch, img_size), ()), key=lambda w: (-w.top1, w.name))),
                )
            )
        return cls(units, source)

    @property
    def measurable(self) -> tuple[Unit, ...]:
        """The units the sweep measures: those with an ImageNet weight."""
        return tuple(u for u in self.units if u.weights)

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(sorted({u.family for u in self.units}))

    def get(self, architecture: str, img_size: int | None = None) -> Unit:
        """One unit by architecture and input size.

        ``architecture`` may also be ``arch@size`` or a weight ``arch.tag``. Without a size, the unit holding the
        architecture's (or the weight's) most accurate result; for an architecture with no ImageNet result, its
        smallest benchmarked size. Raises ``UnknownModelError`` naming close matches.
        """
        if "@" in architecture:
            if img_size is not None:
                raise ValueError(f"{architecture!r} already names a size; leave img_size out")
            architecture, img_size = _split_key(architecture)
        candidates = self._units_of(architecture)
        if img_size is not None:
            for u in candidates:
                if u.img_size == img_size:
                    return u
            sizes = ", ".join(str(u.img_size) for u in candidates)
            raise UnknownModelError(f"{architecture} has no unit at img_size {img_size}; its sizes: {sizes}")
        measured = [u for u in candidates if u.weights]
        if not measured:
            return candidates[0]
        return max(measured, key=lambda u: (_top1_of(u, architecture), -u.img_size))

    def select(
        self,
        *,
        preset: str | None = None,
        names: Sequence[str] = (),
        globs: Sequence[str] = (),
        families: Sequence[str] = (),
        params_m: tuple[float | None, float | None] = (None, None),
        top_k: int | None = None,
        names_file: str | Path | None = None,
        img_size: int | None = None,
    ) -> list[Unit]:
        """The units a sweep measures, in catalog order.

        Filters combine with AND; the entries of one filter (several names, globs or families) with OR.
        Start: the preset's units; with ``names``/``names_file``, the named units (within the preset if one is
        given); with neither, every measurable unit. A name is ``arch`` (every measurable unit of the architecture,
        or all of its units if it has no ImageNet result), ``arch.tag`` (the units where that weight was evaluated)
        or ``arch@size`` (that unit). ``names_file`` holds one name per line; blank lines and ``#`` comments are
        skipped. ``globs`` match the architecture (or the unit key when a pattern contains ``@``), ``families``
        the family (``family_of``), ``params_m`` is an inclusive (low, high) bound on the parameter count in
        millions, either end None for open; ``img_size`` keeps one input size; ``top_k`` keeps the k units with the
        best top-1 accuracy. Raises ValueError naming the filter that left nothing.
        """
        steps: list[tuple[str, Callable[[list[Unit]], list[Unit]]]] = []
        all_names = list(names)
        if names_file is not None:
            all_names += _read_names(names_file)
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(sorted(PRESETS))}")
            base = PRESETS[preset].rule(self)
            start = f"preset {preset!r}"
        else:
            base = list(self.measurable)
            start = "every unit with an ImageNet result"
        if all_names:
            named = {u.key for name in all_names for u in self._resolve(name)}
            if preset is None:
                base = [u for u in self.units if u.key in named]
                start = f"names {_shown(all_names)}"
            else:
                steps.append((f"names {_shown(all_names)}", lambda us: [u for u in us if u.key in named]))
        if families:
            unknown = sorted(set(families) - set(self.families))
            if unknown:
                raise ValueError(f"unknown families {unknown}; valid families: {', '.join(self.families)}")
            wanted = set(families)
            steps.append((f"families {_shown(families)}", lambda us: [u for u in us if u.family in wanted]))
        if globs:
            steps.append((f"globs {_shown(globs)}", lambda us: [u for u in us if _matches_any(u, globs)]))
        low_m, high_m = params_m
        if low_m is not None or high_m is not None:
            if low_m is not None and high_m is not None and low_m > high_m:
                raise ValueError(f"params_m=({low_m}, {high_m}): the low bound is above the high bound")
            steps.append((f"params_m=({low_m}, {high_m})", lambda us: [u for u in us if _in_range(u, low_m, high_m)]))
        if img_size is not None:
            steps.append((f"img_size={img_size}", lambda us: [u for u in us if u.img_size == img_size]))
        if top_k is not None:
            if top_k < 1:
                raise ValueError(f"top_k must be at least 1, not {top_k}")
            steps.append((f"top_k={top_k}", lambda us: _most_accurate(us, top_k)))

        units = base
        if not units:
            raise ValueError(f"{start} selects no unit")
        for label, step in steps:
            kept = step(units)
            if not kept:
                raise ValueError(f"no unit left after {label} ({len(units)} units before it, from {start})")
            units = kept
        order = {u.key: i for i, u in enumerate(self.units)}
        return sorted(units, key=lambda u: order[u.key])

    def _units_of(self, architecture: str) -> list[Unit]:
        """The units of an architecture (accepting ``arch.tag``), or UnknownModelError with close matches."""
        arch, _, tag = architecture.partition(".")
        if arch not in self._by_arch:
            close = difflib.get_close_matches(arch, list(self._by_arch), n=5, cutoff=0.6)
            hint = f"; close matches: {', '.join(close)}" if close else "; see `Catalog.load().units` for all names"
            raise UnknownModelError(f"unknown model {architecture!r}{hint}")
        if not tag:
            return self._by_arch[arch]
        if architecture not in self._weight_units:
            known = sorted({w.name for u in self._by_arch[arch] for w in u.weights})
            close = difflib.get_close_matches(architecture, known, n=5, cutoff=0.6) or known[:10]
            raise UnknownModelError(f"unknown weight {architecture!r}; {arch}'s weights include: {', '.join(close)}")
        return self._weight_units[architecture]

    def _resolve(self, name: str) -> list[Unit]:
        """The units a selection name stands for (see ``select``)."""
        name = name.strip()
        if "@" in name:
            return [self.get(name)]
        units = self._units_of(name)
        return [u for u in units if u.weights] or units


def _split_key(key: str) -> tuple[str, int]:
    arch, _, size = key.rpartition("@")
    try:
        return arch, int(size)
    except ValueError:
        raise ValueError(f"{key!r}: expected 'architecture@img_size' with an integer size") from None


def _top1_of(unit: Unit, name: str) -> float:
    """The unit's top-1 for a weight name, or its best when ``name`` is an architecture."""
    if "." in name:
        return next(w.top1 for w in unit.weights if w.name == name)
    return unit.best_top1 if unit.best_top1 is not None else -math.inf


def _matches_any(unit: Unit, globs: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(unit.key if "@" in g else unit.architecture, g) for g in globs)


def _in_range(unit: Unit, low_m: float | None, high_m: float | None) -> bool:
    p = unit.param_count_m
    return p is not None and (low_m is None or p >= low_m) and (high_m is None or p <= high_m)


def _most_accurate(units: list[Unit], k: int) -> list[Unit]:
    return sorted(units, key=lambda u: (u.best_top1 is None, -(u.best_top1 or 0.0), u.key))[:k]


def _shown(items: Sequence[str]) -> str:
    items = list(items)
    return ", ".join(items[:5]) + (f", ... ({len(items)} in all)" if len(items) > 5 else "")


def _read_names(path: str | Path) -> list[str]:
    names = []
    for line in Path(path).read_text().splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            names.append(name)
    if not names:
        raise ValueError(f"names file {path} lists no model")
    return names


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def _number(text: str | None) -> float | None:
    """A number from timm's tables: empty is None; a thousands comma ("1,014.45", quoted in the CSV) is dropped."""
    if text is None or not text.strip():
        return None
    return float(text.replace(",", ""))


@functools.lru_cache(maxsize=1)
def _load_packaged() -> Catalog:
    data = resources.files(__package__).joinpath("data")
    text = {
        name: data.joinpath(name).read_text(encoding="utf-8")
        for name in (RESULTS_FILE, BENCHMARK_FILE, BENCHMARK_COMPILED_FILE, METADATA_FILE)
    }
    return Catalog.from_tables(
        text[RESULTS_FILE], text[BENCHMARK_FILE], text[BENCHMARK_COMPILED_FILE], text[METADATA_FILE], SOURCE
    )


def _quick(catalog: Catalog) -> list[Unit]:
    """~30 units across families and model sizes, cheap enough for ~10 minutes on an H100.

    Candidates: measurable units with img_size <= 288 and GMACs <= 50, leaving out timm's tiny ``test_*`` networks.
    They are split into 5 equal-count bins by parameter count. Families are ranked by how many measurable
    architectures they have (ties by name); in rank order, each family contributes one unit: its most accurate
    candidate in the bin that holds the fewest picks so far (ties: the smaller bin), among the bins where it has
    candidates. Rounds repeat over the families until 30 units are picked or candidates run out.
    """
    candidates = [
        u
        for u in catalog.measurable
        if u.img_size <= QUICK_MAX_IMG_SIZE
        and u.gmacs is not None
        and u.gmacs <= QUICK_MAX_GMACS
        and u.param_count_m is not None
        and u.family != "test"
    ]
    by_params = sorted(candidates, key=lambda u: (u.param_count_m, u.key))
    bin_of = {u.key: i * QUICK_PARAM_BINS // len(by_params) for i, u in enumerate(by_params)}
    archs_per_family: dict[str, set[str]] = defaultdict(set)
    for u in catalog.measurable:
        archs_per_family[u.family].add(u.architecture)
    ranked = sorted(archs_per_family, key=lambda f: (-len(archs_per_family[f]), f))
    left: dict[str, list[Unit]] = defaultdict(list)
    for u in candidates:
        left[u.family].append(u)
    picks: list[Unit] = []
    per_bin = [0] * QUICK_PARAM_BINS
    while len(picks) < QUICK_SIZE and any(left.values()):
        for family in ranked:
            if len(picks) == QUICK_SIZE:
                break
            if not left[family]:
                continue
            bins = {bin_of[u.key] for u in left[family]}
            b = min(bins, key=lambda i: (per_bin[i], i))
            best = min(
                (u for u in left[family] if bin_of[u.key] == b), key=lambda u: (-(u.best_top1 or 0.0), u.gmacs, u.key)
            )
            picks.append(best)
            per_bin[b] += 1
            left[family].remove(best)
    return picks


PRESETS: dict[str, Preset] = {
    "quick": Preset(
        "quick",
        f"~{QUICK_SIZE} units across families and sizes (img_size <= {QUICK_MAX_IMG_SIZE}, "
        f"<= {QUICK_MAX_GMACS:g} GMACs): about 10 minutes on an H100",
        _quick,
    ),
    "paper": Preset("paper", "every unit with an ImageNet weight", lambda catalog: list(catalog.measurable)),
}
