"""Benchmark: which secret scanner `rotator scan` should build on, measured on the fleet fixture.

Builds the fixture repository of ``rotator.testing.fleet_repo`` (ten agents' `.env` files with
shared and per-agent keys for OpenAI, Anthropic, Stripe, AWS, a database URL and an unknown
service, one key in a script, one in a compose file, one only in git history, and look-alike
non-secrets), then scans its working tree with kingfisher (``kingfisher-secret-scanner``, in
process) and detect-secrets, and its git history with kingfisher (detect-secrets has no history
scan). Prints, per scanner, the planted places found and missed (by service), the false
positives on the look-alikes, and the time; then kingfisher on a generated tree of N files.

    .venv/bin/python bench/scan_compare.py [--files 10000]

Needs `pip install kingfisher-secret-scanner detect-secrets` (both are in the dev extra).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rotator.testing.fleet_repo import FleetRepo, build_fleet_repo  # noqa: E402


def tree_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and ".git" not in p.parts)


def kingfisher_tree(repo: Path) -> tuple[set[tuple[str, int]], float]:
    from kingfisher_sdk import Scanner

    t0 = time.perf_counter()
    scanner = Scanner()
    found = set()
    for path in tree_files(repo):
        for finding in scanner.scan_file(path):
            found.add((str(path.relative_to(repo)), finding.location["line"]))
    return found, time.perf_counter() - t0


def kingfisher_history(repo: Path) -> tuple[set[str], float]:
    from kingfisher_sdk import Scanner, git_inputs

    t0 = time.perf_counter()
    scanner = Scanner()
    paths = set()
    for result in scanner.scan_inputs(git_inputs(str(repo))):
        if result.findings:
            paths.add(str(getattr(result.input, "path", "") or ""))
    return paths, time.perf_counter() - t0


def detect_secrets_tree(repo: Path) -> tuple[set[tuple[str, int]], float]:
    from detect_secrets import SecretsCollection
    from detect_secrets.settings import default_settings

    t0 = time.perf_counter()
    found = set()
    with default_settings():
        collection = SecretsCollection(root=str(repo))
        for path in tree_files(repo):
            collection.scan_file(str(path.relative_to(repo)))
        for filename, secrets in collection.json().items():
            for secret in secrets:
                found.add((filename, secret["line_number"]))
    return found, time.perf_counter() - t0


def report(name: str, fixture: FleetRepo, found: set[tuple[str, int]], took: float) -> None:
    places = [(p.service, place) for p in fixture.planted for place in p.places]
    missed = Counter(service for service, place in places if place not in found)
    hits = sum(1 for _service, place in places if place in found)
    false = sorted(d for d in fixture.decoys if d in found)
    print(f"{name:<16} planted places found {hits}/{len(places)}; missed by service "
          f"{dict(missed) or '-'}; false positives on {len(fixture.decoys)} look-alikes: "
          f"{len(false)}; {took:.2f} s")


def generated_tree(root: Path, files: int) -> None:
    """``files`` small source and config files with no secret, and one key every 500."""
    from rotator.testing.fake_openai import service_account_key_value

    for i in range(files):
        folder = root / f"pkg{i // 100:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        body = "\n".join(f"def f{j}(x):\n    return x * {j}  # {i}" for j in range(20))
        if i % 500 == 0:
            body += f'\nAPI_KEY = "{service_account_key_value()}"\n'
        (folder / f"mod{i}.py").write_text(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rotator-bench-scan-") as tmp:
        fixture = build_fleet_repo(Path(tmp) / "fleet")
        repo = fixture.root
        print(f"fixture: {len(tree_files(repo))} files, {len(fixture.planted)} keys at "
              f"{sum(len(p.places) for p in fixture.planted)} places, 1 only in history, "
              f"{len(fixture.decoys)} look-alikes")
        found, took = kingfisher_tree(repo)
        report("kingfisher", fixture, found, took)
        found, took = detect_secrets_tree(repo)
        report("detect-secrets", fixture, found, took)
        history = [h for p in fixture.planted for h in p.history]
        paths, took = kingfisher_history(repo)
        print(f"kingfisher git history: keys only in history found {len(set(history) & paths)}"
              f"/{len(history)}; {took:.2f} s")
        big = Path(tmp) / "big"
        generated_tree(big, args.files)
        t0 = time.perf_counter()
        found, _ = kingfisher_tree(big)
        print(f"kingfisher on {args.files} generated files: {len(found)} finding(s) "
              f"({args.files // 500 + (1 if args.files % 500 else 0)} planted), "
              f"{time.perf_counter() - t0:.1f} s")
        # What the operator waits for: `rotator scan` itself (agents, sharing, fingerprints,
        # the .env heuristic on top of the engine), in process.
        from rotator.scan import scan

        for label, root, git in (("fixture tree", repo, False), ("fixture --git", repo, True),
                                 (f"{args.files} generated files", big, False)):
            t0 = time.perf_counter()
            inventory = scan([root], git=git)
            print(f"rotator scan, {label}: {len(inventory.found)} place(s), "
                  f"{len({f.fingerprint for f in inventory.found})} key(s), "
                  f"{inventory.files} file(s), {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main()
