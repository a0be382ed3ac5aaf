"""Hours to label Gaia's 220M XP stars at four scales, from benchmarks/results/label_speed.json.

    python benchmarks/survey_estimate.py [--json benchmarks/results/label_speed.json] [--cores-per-gpu 16]

Prints a markdown table (docs/survey_scale.md). Which numbers are measured and which extrapolated
is said in each row.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
N_STARS = 220e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "label_speed.json"))
    ap.add_argument("--cores-per-gpu", type=int, default=16, help="host cores that feed each GPU")
    ap.add_argument("--gpu-model-rate", type=float, default=1e6,
                    help="assumed model-only stars/s of one H100-class GPU (not measured here)")
    args = ap.parse_args()
    r = json.loads(Path(args.json).read_text())
    comp = r["components_one_thread"]
    one = r["one_process_2_cores"]["stars_per_s"]
    per_core = r["two_ranks_1_core_each"]["stars_per_s"] / 2
    parse, tokens = comp["parse_stars_per_s"], comp["tokens_stars_per_s"]
    host = 1 / (1 / parse + 1 / tokens)  # one core: read + parse + tokens, no model
    gz_bytes = r["file_bytes"] / r["rows"]
    rows = []

    def row(scale, rate, how, bottleneck):
        hours = N_STARS / rate / 3600
        rows.append(f"| {scale} | {rate:,.0f} | {hours:,.1f} | {rate * gz_bytes / 1e9:.2f} | {how} | {bottleneck} |")

    row("one 2-core machine", one, "measured (1 process, model thread + 2 parse threads)",
        "CPU: parsing ~{:.0f}%, model ~{:.0f}% of the per-star CPU time".format(
            100 * (1 / host) / (1 / host + 1 / comp["model_fp32_stars_per_s"]),
            100 * (1 / comp["model_fp32_stars_per_s"]) / (1 / host + 1 / comp["model_fp32_stars_per_s"])))
    row("64-core node", 64 * per_core, f"extrapolated: 64 x {per_core:,.0f} stars/s per 1-core rank (measured, "
        "2 ranks on 2 cores)", "CPU parsing; the disk must deliver the GB/s shown")
    gpu = min(args.cores_per_gpu * host, args.gpu_model_rate)
    row("one GPU", gpu, f"extrapolated: {args.cores_per_gpu} host cores x {host:,.0f} stars/s parse+tokens per core "
        f"(measured); GPU model time ~0 (not measured, no GPU in this task)", "host CPU parsing (the GPU idles)")
    row("8 GPUs (one node)", 8 * gpu, "extrapolated: 8 x the one-GPU row (128 host cores)",
        "host CPU parsing, then disk/network read bandwidth")
    print(f"Stars: {N_STARS:.3g}; compressed bytes a star in the generated file: {gz_bytes / 1e3:.1f} kB "
          "(gzip level 1; the archive's files are smaller, so the GB/s column is an upper bound)\n")
    print("| scale | stars/s | hours for 220M | input GB/s | how | bottleneck |")
    print("|---|---:|---:|---:|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
