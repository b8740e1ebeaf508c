"""SeLa's equipartition: the solver `ssl pretext --task sela` uses against the log-space iteration it replaced.

Both run the same stopping rule (every row sum within `--tolerance` of 1/N after a column scaling, at
most `--iterations` rounds) on the same (N, K) log-probabilities in one run; prints seconds, the speed-up
and how many labels agree (target: >= 10x on 20,000 x 100, every label equal).

    python bench/equipartition.py                     # 20,000 x 100, two logit scales, ~4 minutes
    python bench/equipartition.py --n 2000 --k 50     # quick
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from ssl_cli.pretext.losses import sinkhorn


def measure(n: int, k: int, scale: float, lam: float, iterations: int, tolerance: float) -> dict:
    torch.manual_seed(0)
    log_probs = F.log_softmax(torch.randn(n, k) * scale, dim=1).double()
    start = time.perf_counter()
    fast = sinkhorn.equipartition(log_probs, lam, iterations, tolerance)
    fast_seconds = time.perf_counter() - start
    shifted = log_probs * lam
    shifted -= shifted.max(dim=1, keepdim=True).values
    start = time.perf_counter()
    slow = sinkhorn._equipartition_log(shifted, iterations, tolerance)
    slow_seconds = time.perf_counter() - start
    return {"n": n, "k": k, "logit_scale": scale, "tool_seconds": fast_seconds, "log_space_seconds": slow_seconds,
            "speedup": slow_seconds / fast_seconds,
            "labels_equal": float((fast.argmax(1) == slow.argmax(1)).double().mean()),
            "max_abs_difference": float((fast - slow).abs().max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--scales", default="2,6", help="logit scales: 2 converges in ~300 rounds, 6 runs all 1000")
    parser.add_argument("--lam", type=float, default=25.0)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--tolerance", type=float, default=1e-6)
    args = parser.parse_args()
    for scale in (float(value) for value in args.scales.split(",")):
        row = measure(args.n, args.k, scale, args.lam, args.iterations, args.tolerance)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
