"""``python -m selfmoe.benchmark OUT_DIR``: write the built-in benchmark as ``<domain>.jsonl`` files."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import DEFAULT_COUNTS, DOMAINS, write_benchmark


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m selfmoe.benchmark",
        description="Write the built-in benchmark (knowledge, reasoning, math, coding) as JSONL files for "
                    "selfmoe eval --data.",
        epilog="default counts: " + ", ".join(f"{d} {n}" for d, n in DEFAULT_COUNTS.items()))
    p.add_argument("out_dir", help="directory for <domain>.jsonl (created if missing)")
    p.add_argument("--n", type=int, default=None,
                   help="items per domain (a fixed domain with fewer items gives all of them)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated items and of the samples")
    p.add_argument("--domains", default=",".join(DOMAINS), help="comma-separated subset of " + ",".join(DOMAINS))
    args = p.parse_args(argv)
    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    try:
        paths = write_benchmark(args.out_dir, n_per_domain=args.n, seed=args.seed, domains=domains)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for d, path in paths.items():
        print(f"{d}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
