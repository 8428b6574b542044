"""GPU workloads shared by the bench scripts (imported as `from workloads import ...`: scripts run from bench/)."""

from __future__ import annotations

import time


def gemm_loop(torch, cuda_index: int, seconds: float, size: int = 8192) -> tuple[int, float]:
    """bf16 GEMMs of ``size``³ on one GPU for about ``seconds``, in batches of 20 launches, synchronised after each
    batch so the loop ends close to its deadline. Returns (GEMMs run, seconds taken)."""
    dev = torch.device("cuda", cuda_index)
    a = torch.randn(size, size, device=dev, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=dev, dtype=torch.bfloat16)
    c = torch.empty_like(a)
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            torch.matmul(a, b, out=c)
        n += 20
        torch.cuda.synchronize(dev)
    return n, time.perf_counter() - t0


def interleaved_rounds(modes: dict, rounds: int, report, seed: int = 0) -> dict[str, list[dict]]:
    """Run every mode once per round, in a fresh random order each round (a noisy host drifts between rounds: only
    modes measured within one round are compared); ``report(round, mode, result)`` after each. Returns each mode's
    results in round order."""
    import random

    runs: dict[str, list[dict]] = {k: [] for k in modes}
    rng = random.Random(seed)
    for rep in range(rounds):
        order = list(modes)
        rng.shuffle(order)
        for mode in order:
            r = modes[mode]()
            runs[mode].append(r)
            report(rep, mode, r)
    return runs
