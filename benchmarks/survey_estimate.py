"""Hours to label Gaia's 220M XP stars at several scales, from the measured rates in
benchmarks/results/label_speed_fits.json (2-core CPU machine: ``benchmarks/label_speed.py
--converted``, text and converted FITS inputs) and benchmarks/results/gpu_speed.json (one H200
with 16 host cores, measured in a lent device session).

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


def in_file_rate(two_ranks: dict) -> float:
    """Stars/s of the ranks together while in their files: the process start-up (~3 s: imports,
    loading the model) left out, as it is over 220M stars."""
    return sum(f["stars"] / f["seconds"] for rank in two_ranks["ranks"] for f in rank["result"]["files"])


def two_core_rates(r: dict) -> dict:
    """The measured 2-core rates of a label_speed.json (today's code: its "after" part)."""
    after = r.get("after", r)
    out = {"two_ranks": in_file_rate(after["two_ranks_1_core_each"]),
           "two_ranks_wall": after["two_ranks_1_core_each"]["stars_per_s"],
           "one_process": after.get("one_process_2_cores", {}).get("stars_per_s")}
    conv = r.get("converted")
    if conv:
        out["convert"] = conv["convert"]["stars_per_s"]
        out["from_fits"] = in_file_rate(conv["label_fits"]["two_ranks_1_core_each"])
        out["from_fits_wall"] = conv["label_fits"]["two_ranks_1_core_each"]["stars_per_s"]
        out["gz_bytes"] = conv["convert"]["text_gz_bytes_per_star"]
        out["fits_bytes"] = conv["convert"]["fits_bytes_per_star"]
    else:
        sizes = r["file_bytes"]
        out["gz_bytes"] = sizes["small"] / r["component_rows"] if isinstance(sizes, dict) else sizes / r["rows"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "label_speed_fits.json"),
                    help="a label_speed.json (with --converted for the second-pass rows)")
    ap.add_argument("--gpu-json", default=str(ROOT / "benchmarks" / "results" / "gpu_speed.json"))
    args = ap.parse_args()
    c = two_core_rates(json.loads(Path(args.json).read_text()))
    g = json.loads(Path(args.gpu_json).read_text())["results"]["default"]
    two, per_core, gz_bytes = c["two_ranks"], c["two_ranks"] / 2, c["gz_bytes"]
    ranks = max(g["ranks_end_to_end"], key=lambda x: x["stars"])
    model_only = max(g["inference_eager"]["model_only"].values())
    parse_share = sum(ranks["parse_s_per_rank"]) / sum(ranks["rank_wall_s"])
    model_share = sum(ranks["model_s_per_rank"]) / sum(ranks["rank_wall_s"])
    rows = []

    def row(scale, rate, how, bottleneck, bytes_a_star=gz_bytes):
        hours = N_STARS / rate / 3600
        rows.append(f"| {scale} | {rate:,.0f} | {hours:,.1f} | {rate * bytes_a_star / 1e9:.2f} | {how} | {bottleneck} |")

    one = f" ({c['one_process']:,.0f} stars/s as 1 process with 2 parse threads)" if c["one_process"] else ""
    row("one 2-core machine, from .csv.gz", two, f"measured: 2 ranks, one core each, in their files "
        f"({c['two_ranks_wall']:,.0f} stars/s with the start-up of 20,000-star runs){one}",
        "CPU: the model, then parsing the text")
    if "from_fits" in c:
        row("one 2-core machine, converting (`stellarlm convert`)", c["convert"],
            "measured: 2 processes, one core each, start-up included", "CPU: gunzip and parsing the text")
        row("one 2-core machine, a second pass from the FITS", c["from_fits"],
            f"measured: 2 ranks, one core each, in their files ({c['from_fits_wall']:,.0f} stars/s with the "
            "start-up)", "CPU: the model", c["fits_bytes"])
    row("64-core node, from .csv.gz", 64 * per_core, f"extrapolated: 64 x {per_core:,.0f} stars/s per 1-core rank "
        "(measured, 2 ranks on 2 cores)", "CPU; the disk must deliver the GB/s shown")
    row("one GPU (H200, 16 host cores)", ranks["stars_per_s"],
        f"measured: {ranks['ranks']} ranks sharing the GPU, {ranks['rows_per_rank']:,} stars each, start-up "
        "included (an earlier model and reader)",
        f"host CPU parsing: {parse_share:.0%} of each rank's wall time, the model {model_share:.1%} "
        f"(the GPU alone answers {model_only:,.0f} stars/s)")
    row("8 GPUs (one node)", 8 * ranks["stars_per_s"], "extrapolated: 8 x the one-GPU row (8 x 16 host cores)",
        "host CPU parsing, then disk/network read bandwidth")
    print(f"Stars: {N_STARS:.3g}; compressed bytes a star in the generated file: {gz_bytes / 1e3:.1f} kB "
          "(gzip level 1 of 256 spectra repeated; the archive's files compress differently)"
          + (f"; converted FITS: {c['fits_bytes'] / 1e3:.1f} kB a star" if "fits_bytes" in c else "") + "\n")
    print("| scale | stars/s | hours for 220M | input GB/s | how | bottleneck |")
    print("|---|---:|---:|---:|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
