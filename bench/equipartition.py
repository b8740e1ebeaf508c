"""SeLa's equipartition: the solver `ssl pretext --task sela` uses against the ones it replaced.

Speed rows (default): on the same (N, K) log-probabilities in one run, the blocked float32 solver SeLa runs
(`sinkhorn.equipartition_labels`), the whole-matrix float64 exp-space solver it replaced (`equipartition`,
kept as the reference) and the log-space iteration before that, all on the same stopping rule (every row sum
within `--tolerance` of 1/N after a column scaling, at most `--iterations` rounds); prints seconds, speed-ups
and how many labels agree with the float64 solver (targets: >= 10x over log space on 20,000 x 100, every
label equal).

Memory rows (`--memory N,K`): each solver in a fresh process on (N, K) float32 log-probabilities (what the
labelling pass holds for one head), for `--memory-iterations` rounds (memory does not depend on how many);
prints the peak RSS beyond those log-probabilities (ru_maxrss minus the RSS once they are made) and the
seconds (the rounds and the setup: shifts and exp). The float64 row is SeLa's previous path for one head: `.double()` of the head's
log-probabilities, then `equipartition`.

    python bench/equipartition.py                      # 20,000 x 100, two logit scales, ~4 minutes
    python bench/equipartition.py --n 2000 --k 50      # quick
    python bench/equipartition.py --memory 200000,3000 --scales none   # peak memory at 200k x 3000, ~3 minutes
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from ssl_cli.pretext.losses import sinkhorn


def measure(n: int, k: int, scale: float, lam: float, iterations: int, tolerance: float) -> dict:
    torch.manual_seed(0)
    log_probs = F.log_softmax(torch.randn(n, k) * scale, dim=1)
    start = time.perf_counter()
    blocked = sinkhorn.equipartition_labels(log_probs, lam, iterations, tolerance)
    blocked_seconds = time.perf_counter() - start
    start = time.perf_counter()
    fast = sinkhorn.equipartition(log_probs.double(), lam, iterations, tolerance)
    fast_seconds = time.perf_counter() - start
    shifted = log_probs.double() * lam
    shifted -= shifted.max(dim=1, keepdim=True).values
    start = time.perf_counter()
    slow = sinkhorn._equipartition_log(shifted, iterations, tolerance)
    slow_seconds = time.perf_counter() - start
    return {"n": n, "k": k, "logit_scale": scale, "tool_seconds": blocked_seconds, "float64_seconds": fast_seconds,
            "log_space_seconds": slow_seconds, "speedup": slow_seconds / blocked_seconds,
            "tool_vs_float64": fast_seconds / blocked_seconds,
            "labels_equal": float((blocked == fast.argmax(1)).double().mean()),
            "float64_vs_log_space_labels_equal": float((fast.argmax(1) == slow.argmax(1)).double().mean()),
            "max_abs_difference": float((fast - slow).abs().max())}


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def memory_child(solver: str, n: int, k: int, lam: float, iterations: int) -> dict:
    """In a fresh process: peak RSS beyond the (n, k) float32 log-probabilities while `solver` runs."""
    torch.set_num_threads(1)
    # made in place, block by block: no temporary as large as the matrix raises the peak before the solver runs
    log_probs = torch.empty(n, k).normal_(generator=torch.Generator().manual_seed(0)).mul_(2)
    for block in log_probs.split(4096):
        block.sub_(block.logsumexp(dim=1, keepdim=True))
    before = rss_bytes()
    start = time.perf_counter()
    if solver == "float64":  # SeLa before: a float64 copy of the head's rows, then the whole-matrix solver
        sinkhorn.equipartition(log_probs.double(), lam, iterations, tolerance=1e-30).argmax(1)
    else:
        sinkhorn.equipartition_labels(log_probs, lam, iterations, tolerance=1e-30, overwrite=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return {"solver": solver, "n": n, "k": k, "log_probs_bytes": 4 * n * k, "peak_beyond_log_probs_bytes": peak - before,
            "peak_rss_bytes": peak, "rounds": iterations, "seconds": seconds}


def memory_rows(n: int, k: int, lam: float, iterations: int) -> list[dict]:
    rows = []
    for solver in ("float64", "tool"):
        done = subprocess.run([sys.executable, __file__, "--memory-child", solver, "--memory", f"{n},{k}",
                               "--lam", str(lam), "--memory-iterations", str(iterations)],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    old, new = rows
    return rows + [{"n": n, "k": k, "peak_beyond_log_probs_ratio": old["peak_beyond_log_probs_bytes"]
                    / max(1, new["peak_beyond_log_probs_bytes"]),
                    "seconds_ratio": old["seconds"] / new["seconds"]}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--scales", default="2,6",
                        help="logit scales: 2 converges in ~300 rounds, 6 runs all 1000; 'none': no speed rows")
    parser.add_argument("--lam", type=float, default=25.0)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--tolerance", type=float, default=1e-6)
    parser.add_argument("--memory", default=None, help="N,K: add the peak-memory rows at N x K")
    parser.add_argument("--memory-iterations", type=int, default=5, help="rounds in the memory rows")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        n, k = (int(value) for value in args.memory.split(","))
        print(json.dumps(memory_child(args.memory_child, n, k, args.lam, args.memory_iterations)))
        return
    if args.scales != "none":
        for scale in (float(value) for value in args.scales.split(",")):
            print(json.dumps(measure(args.n, args.k, scale, args.lam, args.iterations, args.tolerance)))
    if args.memory:
        n, k = (int(value) for value in args.memory.split(","))
        for row in memory_rows(n, k, args.lam, args.memory_iterations):
            print(json.dumps(row))


if __name__ == "__main__":
    main()
