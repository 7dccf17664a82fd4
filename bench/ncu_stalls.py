"""Summarises `ncu --page source --csv --print-source sass` output: per kernel, the warp-stall
reasons over all samples and the SASS instructions holding the most samples (with the one
before each, which is usually what the stall waits on).

    python3 bench/ncu_stalls.py prof.source-sass.csv [top]
"""

import collections
import csv
import sys


def kernels(path):
    current = None
    header = None
    for row in csv.reader(open(path)):
        if row and row[0] == "Kernel Name":
            current = {"name": row[1], "rows": []}
            yield current
        elif row and row[0] == "Address":
            header = row
            current["header"] = header
        elif current is not None and row:
            current["rows"].append(row)


def main():
    path = sys.argv[1]
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 14
    for kernel in list(kernels(path)):  # rows arrive after each kernel is yielded
        header = kernel.get("header")
        if not header:
            continue
        index = {name: i for i, name in enumerate(header)}
        samples_at = index["Warp Stall Sampling (All Samples)"]
        reasons = [n for n in header if n.startswith("stall_") and "Not Issued" not in n]
        totals = collections.Counter()
        data = []
        for row in kernel["rows"]:
            try:
                samples = int(row[samples_at] or 0)
            except ValueError:
                continue
            data.append((samples, row[0], row[1]))
            for reason in reasons:
                try:
                    totals[reason] += int(row[index[reason]] or 0)
                except ValueError:
                    pass
        total = max(1, sum(d[0] for d in data))
        print(f"== {kernel['name'][:100]}  samples {total}")
        print("  stalls: " + ", ".join(f"{n[6:]} {100 * v // total}%"
                                       for n, v in totals.most_common(8)))
        position = {d[1]: i for i, d in enumerate(data)}
        for samples, address, source in sorted(data, reverse=True)[:top]:
            i = position[address]
            before = data[i - 1][2] if i > 0 else ""
            print(f"  {100 * samples / total:5.1f}%  {source.strip()[:64]:64s} | after: "
                  f"{before.strip()[:56]}")


if __name__ == "__main__":
    main()
