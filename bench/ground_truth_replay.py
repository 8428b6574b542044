"""Recorded ground-truth mixes: their file format (save_raw, load_mix), and a replay of them through the per-kernel
estimators, without a GPU.

    python bench/ground_truth_replay.py [DIR ...]     (default: bench/data/h100_ground_truth)

Each .npz is one band of `bench/kernel_ground_truth.py --raw-dir`: the mix's kernel timeline, the readings its
Measurement integrated, the window, the sensor response used, and the truth (each class's power alone, and which
kernel names belong to it). The error of a class is its estimated energy over (power alone x its busy time in the
mix) - 1, as in kernel_ground_truth.py. A change to wattscope.kernels can so be judged on real H100 readings before
it costs GPU time.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wattscope.kernels import Attribution, KernelTimeline, attribute
from wattscope.response import Response

DEFAULT_DIR = Path(__file__).resolve().parent / "data" / "h100_ground_truth"
NAME_SEPARATOR = "\x1f"  # joins a class's kernel names in a file


@dataclass(frozen=True)
class Mix:
    band: str
    timeline: KernelTimeline
    t_ns: np.ndarray
    power_w: np.ndarray
    start_ns: int
    stop_ns: int
    response: Response
    class_names: dict[str, set[str]]
    alone_power_w: dict[str, float]
    hot_power_w: dict[str, float] | None  # alone at the mix's temperature (kernel_ground_truth.py --hot-stretches)


def save_raw(path: str, t_ns, power_w, start_ns: int, stop_ns: int, timeline: KernelTimeline, response: Response,
             alone_power_w: dict[str, float], names_of: dict[str, set[str]], hot_power_w: dict[str, float] | None
             ) -> None:
    """Everything an estimator gets, and the truth: what kernel_ground_truth.py --raw-dir writes for each mix. The
    classes are alone_power_w's keys, in its order."""
    classes = list(alone_power_w)
    np.savez_compressed(
        path, t_ns=t_ns, power_w=power_w, start_ns=start_ns, stop_ns=stop_ns,
        tl_start_ns=timeline.start_ns, tl_end_ns=timeline.end_ns, tl_name=np.asarray(timeline.name, dtype=str),
        tl_kind=np.asarray(timeline.kind, dtype=str),
        response=np.array([response.kind, response.shape_ns, response.delay_ns], str),
        classes=np.array(classes), alone_power_w=np.array([alone_power_w[c] for c in classes]),
        class_names=np.array([NAME_SEPARATOR.join(sorted(names_of[c])) for c in classes]),
        hot_power_w=np.array([hot_power_w[c] for c in classes]) if hot_power_w else np.zeros(0))


def load_mix(path: Path) -> Mix:
    with np.load(path) as z:
        n = z["tl_start_ns"].size
        timeline = KernelTimeline(z["tl_start_ns"], z["tl_end_ns"], z["tl_name"].astype(object),
                                  np.zeros(n, np.int64), np.zeros(n, np.int64), z["tl_kind"].astype(object))
        kind, shape_ns, delay_ns = (str(v) for v in z["response"])
        classes = [str(c) for c in z["classes"]]
        hot = z["hot_power_w"] if "hot_power_w" in z.files else np.zeros(0)
        return Mix(
            band=path.stem.removeprefix("mix_"), timeline=timeline, t_ns=z["t_ns"], power_w=z["power_w"],
            start_ns=int(z["start_ns"]), stop_ns=int(z["stop_ns"]),
            response=Response(kind, float(shape_ns), float(delay_ns)),
            class_names={c: set(str(s).split(NAME_SEPARATOR)) for c, s in zip(classes, z["class_names"], strict=True)},
            alone_power_w={c: float(w) for c, w in zip(classes, z["alone_power_w"], strict=True)},
            hot_power_w={c: float(w) for c, w in zip(classes, hot, strict=True)} if hot.size else None,
        )


def load_dir(directory: Path) -> list[Mix]:
    return [load_mix(p) for p in sorted(directory.glob("*.npz"))]


def class_busy_s(timeline: KernelTimeline, names: set[str]) -> float:
    """Summed duration of the records of a class (its kernel names), s."""
    sel = np.isin(timeline.name, list(names))
    return float(np.sum(timeline.end_ns[sel] - timeline.start_ns[sel])) / 1e9


def class_energy_j(att: Attribution, names: set[str]) -> tuple[float, float]:
    """A class's energy in an attribution (the rows of its kernel names) and its uncertainty, J."""
    rows = [row for row in att.rows if row.name in names]
    return sum(row.energy_j for row in rows), math.sqrt(sum(row.uncertainty_j ** 2 for row in rows))


def class_errors(mix: Mix, method: str, *, hot: bool = False) -> tuple[dict[str, float], Attribution]:
    """Signed relative error of each class's energy against its power alone (``hot``: alone at the mix's
    temperature), and the attribution it came from."""
    truth_w = mix.hot_power_w if hot else mix.alone_power_w
    if truth_w is None:
        raise ValueError(f"{mix.band}: this mix was recorded without a hot truth (--hot-stretches)")
    att = attribute(mix.timeline, mix.t_ns, mix.power_w, mix.start_ns, mix.stop_ns, response=mix.response,
                    method=method)
    clipped = mix.timeline.clip(mix.start_ns, mix.stop_ns)
    errors = {}
    for cls, names in mix.class_names.items():
        errors[cls] = class_energy_j(att, names)[0] / (truth_w[cls] * class_busy_s(clipped, names)) - 1.0
    return errors, att


def main(argv: list[str]) -> int:
    directories = [Path(a) for a in argv] or [DEFAULT_DIR]
    for directory in directories:
        mixes = load_dir(directory)
        if not mixes:
            print(f"no .npz mixes in {directory}: record some with kernel_ground_truth.py --raw-dir", file=sys.stderr)
            return 2
        print(f"{directory}: {len(mixes)} mixes")
        for mix in mixes:
            for method in ("overlap", "model"):
                errors, att = class_errors(mix, method)
                cells = "  ".join(f"{c} {e * 100:+7.2f} %" for c, e in errors.items())
                fit = next((n.split(": ", 1)[1] for n in att.notes if n.startswith("fit of")), "")
                print(f"  {mix.band:9} {method:8} {cells}  {fit}")
                if mix.hot_power_w is not None:
                    hot, _ = class_errors(mix, method, hot=True)
                    print(f"  {'':9} {'(hot)':8} " + "  ".join(f"{c} {e * 100:+7.2f} %" for c, e in hot.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
