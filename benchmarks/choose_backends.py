"""Write which fused backend is faster per loss on this GPU into kdfast/backend_choice.json.

Reads the last run recorded in benchmarks/results/<csv> (default losses_gpu.csv, written
by `bench_losses.py --preset gpu`), compares the forward+backward medians of kdfast-triton
and kdfast-cuda per loss (summed over the run's shapes), and records the faster one under
the run's GPU name, with the commit and date it was measured at. backend="auto" then uses
that choice on that GPU. Usage: python benchmarks/choose_backends.py [--csv losses_gpu.csv]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
CHOICE_FILE = os.path.join(HERE, "..", "kdfast", "backend_choice.json")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", default="losses_gpu.csv")
    args = parser.parse_args(argv)
    with open(os.path.join(HERE, "results", args.csv)) as handle:
        rows = list(csv.DictReader(handle))
    last = rows[-1]
    run = [r for r in rows if all(r[k] == last[k] for k in ("commit", "date", "device"))
           and r["mode"] == "forward+backward" and r["provider"] in ("kdfast-triton", "kdfast-cuda")]
    totals = defaultdict(lambda: defaultdict(float))
    for r in run:
        totals[r["loss"]][r["provider"].split("-", 1)[1]] += float(r["median_ms"])
    choices = {loss: min(times, key=times.get) for loss, times in totals.items() if len(times) == 2}
    with open(CHOICE_FILE) as handle:
        table = json.load(handle)
    table["devices"][last["device"]] = {**choices, "measured": f"commit {last['commit']}, {last['date']}"}
    with open(CHOICE_FILE, "w") as handle:
        json.dump(table, handle, indent=2)
        handle.write("\n")
    for loss, backend in choices.items():
        print(f"{last['device']}: {loss} -> {backend} ({', '.join(f'{k} {v:.3f} ms' for k, v in totals[loss].items())})")


if __name__ == "__main__":
    main()
