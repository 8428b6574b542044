"""What a kernel meter records for a replayed CUDA graph: one record per kernel node per replay (CUPTI's default).

    python3 bench/cuda_graph_kernels.py

Captures a graph of 10 bf16 matmuls, replays it 50 times under PowerMeter(kernels=True), and prints how many kernel
records the meter got (500 expected for node-level records, 50 for graph-level ones) and the top rows.
"""

from __future__ import annotations

import sys


def main() -> int:
    import torch

    import wattscope

    a = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(a)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on a side stream, as torch's graph docs ask
        for _ in range(3):
            torch.matmul(a, a, out=out)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            torch.matmul(a, a, out=out)
    torch.cuda.synchronize()
    with wattscope.PowerMeter(0, kernels=True) as m:
        for _ in range(50):
            graph.replay()
    att = m.kernel_attribution(method="overlap")
    n = int((att.timeline.kind == "kernel").sum())
    print(f"graph of 10 matmuls replayed 50 times: {n} kernel records (node-level: 500, graph-level: 50), "
          f"dropped {att.timeline.dropped}")
    print(att.table.head(4).to_string())
    return 0 if n == 500 else 1


if __name__ == "__main__":
    sys.exit(main())
