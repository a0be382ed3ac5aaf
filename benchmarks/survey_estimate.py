"""Hours to label Gaia's 220M XP stars at four scales, from the measured rates in
benchmarks/results/label_speed.json (2-core CPU machine) and benchmarks/results/gpu_speed.json
(one H200 with 16 host cores, measured in a lent device session).

    python benchmarks/survey_estimate.py

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
    ap.add_argument("--gpu-json", default=str(ROOT / "benchmarks" / "results" / "gpu_speed.json"))
    args = ap.parse_args()
    r = json.loads(Path(args.json).read_text())
    g = json.loads(Path(args.gpu_json).read_text())["results"]["default"]
    one = r["one_process_2_cores"]["stars_per_s"]
    two = r["two_ranks_1_core_each"]["stars_per_s"]
    per_core = two / 2
    gz_bytes = r["file_bytes"] / r["rows"]
    ranks = max(g["ranks_end_to_end"], key=lambda x: x["stars"])
    model_only = max(g["inference_eager"]["model_only"].values())
    parse_share = sum(ranks["parse_s_per_rank"]) / sum(ranks["rank_wall_s"])
    model_share = sum(ranks["model_s_per_rank"]) / sum(ranks["rank_wall_s"])
    rows = []

    def row(scale, rate, how, bottleneck):
        hours = N_STARS / rate / 3600
        rows.append(f"| {scale} | {rate:,.0f} | {hours:,.1f} | {rate * gz_bytes / 1e9:.2f} | {how} | {bottleneck} |")

    row("one 2-core machine", two, f"measured: 2 ranks, one core each ({one:,.0f} stars/s as 1 process with 2 "
        "parse threads)", "CPU: parsing the text and the model share it")
    row("64-core node", 64 * per_core, f"extrapolated: 64 x {per_core:,.0f} stars/s per 1-core rank (measured, "
        "2 ranks on 2 cores)", "CPU parsing; the disk must deliver the GB/s shown")
    row("one GPU (H200, 16 host cores)", ranks["stars_per_s"],
        f"measured: {ranks['ranks']} ranks sharing the GPU, {ranks['rows_per_rank']:,} stars each, start-up included",
        f"host CPU parsing: {parse_share:.0%} of each rank's wall time, the model {model_share:.1%} "
        f"(the GPU alone answers {model_only:,.0f} stars/s)")
    row("8 GPUs (one node)", 8 * ranks["stars_per_s"], "extrapolated: 8 x the one-GPU row (8 x 16 host cores)",
        "host CPU parsing, then disk/network read bandwidth")
    print(f"Stars: {N_STARS:.3g}; compressed bytes a star in the generated file: {gz_bytes / 1e3:.1f} kB "
          "(gzip level 1; the archive's files are smaller, so the GB/s column is an upper bound)\n")
    print("| scale | stars/s | hours for 220M | input GB/s | how | bottleneck |")
    print("|---|---:|---:|---:|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
