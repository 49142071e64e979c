"""What a related app's requests cost a hook: parse and build N requests of 1024-CPU lists.

The worst a remote app can send within the library's caps: N requests (the cap is 1024), each
pinning 1024 host CPUs by list (MAX_CORES). Each case is measured in this process, best of
`--runs`, through the two steps every provider hook takes: the library's `parse_requests`
(pydantic, the databag as JSON text) and the workload's `serve.gather` (one VmSpec per
request, duplicate and range checks included). The report gives seconds per case and the
ratio of the largest case to the smallest per request: about 1.0 when the cost is linear in
the number of requests (a quadratic check would show a ratio near the size ratio).

    PYTHONPATH=src:lib .venv/bin/python -m bench.relation_requests [--runs N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import charms.vm_host.v0.vm_host as lib
from vmhost.relation import serve

SIZES = (100, 300, 1000)
CPUS = 1024


def databag(count: int) -> dict[str, str]:
    requests = [
        {"id": f"vm-{i}", "memory": 1024, "pinned-cores": list(range(CPUS))} for i in range(count)
    ]
    return {"version": '"0"', "requests": json.dumps(requests, separators=(",", ":"))}


def one_hook(bag: dict[str, str]) -> tuple[float, float, int]:
    started = time.perf_counter()
    valid, invalid = lib.parse_requests(bag)
    parsed = time.perf_counter()
    built = serve.gather(
        7,
        "consumer",
        [r.model_dump(mode="json", by_alias=True, exclude_none=True) for r in valid],
        [(bad.id, bad.reason) for bad in invalid],
        default_root_gb=20,
    )
    done = time.perf_counter()
    assert len(built) == len(valid) + len(invalid)
    assert all(r.spec is not None for r in built), [r.error for r in built if r.error][:1]
    return parsed - started, done - parsed, len(bag["requests"])


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    for count in SIZES:
        bag = databag(count)
        runs = [one_hook(bag) for _ in range(args.runs)]
        parse_s = min(r[0] for r in runs)
        build_s = min(r[1] for r in runs)
        results[str(count)] = {
            "requests": count,
            "databag_chars": runs[0][2],
            "parse_s": round(parse_s, 4),
            "build_s": round(build_s, 4),
            "per_request_ms": round((parse_s + build_s) / count * 1000, 3),
        }
        print(
            f"{count:5d} requests x {CPUS} CPUs ({runs[0][2] / 1e6:.2f} M chars): "
            f"parse {parse_s:.3f} s, build {build_s:.3f} s, "
            f"{results[str(count)]['per_request_ms']:.3f} ms per request"
        )
    small, large = results[str(SIZES[0])], results[str(SIZES[-1])]
    ratio = large["per_request_ms"] / small["per_request_ms"]
    print(
        f"per-request cost at {SIZES[-1]} vs {SIZES[0]} requests: {ratio:.2f}x "
        f"(linear: ~1; quadratic: ~{SIZES[-1] // SIZES[0]})"
    )
    if args.out:
        args.out.write_text(
            json.dumps({"cases": results, "per_request_ratio": round(ratio, 3)}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
