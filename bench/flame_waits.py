"""Where the association threads of a ``bench_ingest.py --flame X.txt`` recording spend
their wall time: samples per innermost node / storage / audit frame and leaf.

    python bench/flame_waits.py /tmp/wall4.txt [--top 15]
"""
from __future__ import annotations

import argparse
import collections

OURS = ("(node/", "(storage/", "(audit/")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stacks")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    where: collections.Counter[str] = collections.Counter()
    total = 0
    with open(args.stacks) as fh:
        for line in fh:
            stack, n = line.rstrip().rsplit(" ", 1)
            frames = stack.split(";")
            if "AcceptorThread" not in frames[0]:
                continue
            total += int(n)
            ours = [f for f in frames if any(k in f for k in OURS)]
            where[(ours[-1] if ours else "(pynetdicom / other)") + " | " + frames[-1]] += int(n)
    print(f"association-thread samples: {total}\n")
    print("| share | innermost node/storage/audit frame \\| leaf |\n|---:|---|")
    for k, v in where.most_common(args.top):
        print(f"| {100 * v / total:.1f} % | {k.replace('|', chr(92) + '|')} |")


if __name__ == "__main__":
    main()
