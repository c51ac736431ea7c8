"""Before/after W1/W2 CPU timings of issue 37's refactor, from alternating runs (before-1,
after-1, before-2, ...) of the same bench command in the two trees.

Two views: the median time of each case (sensitive to the machine's drift between runs) and
the speed-up over the Hugging Face layer measured in the same run (the benchmark suite's own
figure: the HF layer's code is the same in both trees, so the ratio cancels the drift). A case
is "within the spread" when the after runs' range overlaps the before runs' range.
Usage: python compare.py DIR (holding before-N/ and after-N/ bench results)."""
import json
import statistics
import sys
from pathlib import Path


def rows_of(folder: Path) -> list:
    return json.loads((folder / "results.json").read_text())["rows"]


def table(runs: dict, value, unit: str, keys) -> tuple[str, int]:
    lines = [f"| case | before {unit} median (min-max) | after {unit} median (min-max) "
             "| after/before | within spread |", "|---|---|---|---|---|"]
    inside = 0
    for key in keys:
        b = [value(r, key) for r in runs["before"]]
        a = [value(r, key) for r in runs["after"]]
        ok = min(a) <= max(b) and min(b) <= max(a)
        inside += ok
        lines.append(f"| {key} | {statistics.median(b):.3f} ({min(b):.3f}-{max(b):.3f}) "
                     f"| {statistics.median(a):.3f} ({min(a):.3f}-{max(a):.3f}) "
                     f"| {statistics.median(a) / statistics.median(b):.3f} "
                     f"| {'yes' if ok else 'no'} |")
    return "\n".join(lines), inside


def main(root: Path) -> None:
    runs = {side: [{(r["group"], r["impl"]): r for r in rows_of(p)}
                   for p in sorted(root.glob(f"{side}-*")) if p.is_dir()]
            for side in ("before", "after")}
    print(f"runs: {len(runs['before'])} before, {len(runs['after'])} after\n")
    groups = sorted({g for side in runs.values() for run in side for g, impl in run
                     if impl == "pifi_fast"})

    def ms(run, group):
        return run[(group, "pifi_fast")]["median_s"] * 1e3

    def speedup(run, group):
        return run[(group, "pifi_fast")]["speedup_vs"]["hf_sdpa"]

    for title, value, unit in (("pifi_fast median time", ms, "ms"),
                               ("pifi_fast speed-up over the HF layer (SDPA), same run",
                                speedup, "x")):
        text, inside = table(runs, value, unit, groups)
        print(f"## {title}\n\n{text}\n\n{inside} of {len(groups)} cases within the spread\n")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent))
