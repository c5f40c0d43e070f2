#!/usr/bin/env python3
"""Agreement of aha-rewards' math verifier with Math-Verify, per category.

Needs Python 3.10+ and Math-Verify (never a CI dependency), e.g.

    python3 -m venv /tmp/mv && /tmp/mv/bin/pip install math-verify
    /tmp/mv/bin/python scripts/math_verify_agreement.py

Reads tests/fixtures/rewards/math_agreement_cases.jsonl (one case a line:
`category`, `gold`, `pred`, hand-written realistic completions), records
Math-Verify's default verdict `verify(parse(gold), parse(pred))` in each
line's `math_verify` field (1 or 0) and rewrites the file, then runs the
Rust test that compares our lenient verifier with those verdicts and prints
the agreement per category (`cargo test -p aha-rewards --test
math_agreement -- --nocapture`). With `--no-cargo` it only records.
CI runs the Rust test alone, on the recorded verdicts.
"""

import json
import os
import subprocess
import sys

from math_verify import parse, verify

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = os.path.join(ROOT, "tests", "fixtures", "rewards", "math_agreement_cases.jsonl")


def math_verify_verdict(gold: str, pred: str) -> int:
    try:
        return int(bool(verify(parse(gold), parse(pred))))
    except Exception:  # Math-Verify's own failures count as "not equal"
        return 0


def main() -> int:
    with open(CASES, encoding="utf-8") as f:
        cases = [json.loads(line) for line in f if line.strip()]
    for case in cases:
        case["math_verify"] = math_verify_verdict(case["gold"], case["pred"])
    with open(CASES, "w", encoding="utf-8") as f:
        for case in cases:
            f.write(json.dumps(case, ensure_ascii=False) + "\n")
    print(f"recorded Math-Verify's verdict on {len(cases)} cases in {CASES}")
    if "--no-cargo" in sys.argv:
        return 0
    cmd = ["cargo", "test", "-q", "-p", "aha-rewards", "--test", "math_agreement", "--", "--nocapture"]
    return subprocess.call(cmd, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
