"""Mutation testing of the Numba kernels: a manual lane, never part of the default test command.

Each mutant in ``tools/kernel_mutants.py`` replaces one exact snippet of a kernel module (anchored by text,
not line numbers, so the list survives merges). For every mutant this script copies the checkout to a
temporary directory, applies the change there, and runs the mutant's tests with ``PYTHONPATH`` at the copy
and an EMPTY ``NUMBA_CACHE_DIR`` -- Numba's cache does not track calls into other modules, so cached machine
code could otherwise hide a mutant. Any test failure, crash or timeout kills the mutant. A snippet that is
no longer in the file (the code moved on) is reported as ``stale`` instead of failing the run; mutants
declared equivalent are listed with their justification and not run.

    NUMBA_NUM_THREADS=1 python tools/mutate_kernels.py --json docs/mutation-kernels.json
    python tools/mutate_kernels.py --list                 # check every snippet, run nothing
    python tools/mutate_kernels.py --only pool-03 int-07  # a few mutants

The unmutated copy runs every mutant's tests first (the baseline); the run stops if they fail.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from kernel_mutants import MUTANTS  # noqa: E402

COPIED = ("microcnn", "tests", "conftest.py", "pyproject.toml")


def copy_checkout(dst: Path) -> None:
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", ".hypothesis"))
        else:
            shutil.copy2(src, dst / name)


def snippet_count(mutant) -> int:
    return (ROOT / mutant.file).read_text().count(mutant.original)


def run_tests(work: Path, cache: Path, tests, timeout: float, extra_env=()) -> tuple[str, str, float]:
    """(status, last output line, seconds) of pytest on ``tests`` in the copy ``work``, with the
    environment variables ``extra_env`` ((name, value) pairs) on top of ours."""
    env = {**os.environ, "PYTHONPATH": str(work), "NUMBA_CACHE_DIR": str(cache),
           "NUMBA_NUM_THREADS": os.environ.get("NUMBA_NUM_THREADS", "1"), **dict(extra_env)}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-o", "addopts=", "-p", "no:cacheprovider",
           "-m", "not slow", *tests]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "killed", f"timeout after {timeout:g} s", time.perf_counter() - t0
    lines = [ln for ln in (done.stdout + done.stderr).splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    return ("survived" if done.returncode == 0 else "killed"), f"rc={done.returncode}: {last}", \
        time.perf_counter() - t0


def run_one(mutant, timeout: float, baseline: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="microcnn-mutant-") as tmp:
        work, cache = Path(tmp) / "src", Path(tmp) / "numba-cache"
        work.mkdir()
        cache.mkdir()  # empty: every kernel compiles from the mutated source
        copy_checkout(work)
        if not baseline:
            target = work / mutant.file
            text = target.read_text()
            target.write_text(text.replace(mutant.original, mutant.replacement, 1))
        return dict(zip(("status", "detail", "seconds"),
                        run_tests(work, cache, mutant.tests, timeout, mutant.env), strict=True))


def summarise(results: list[dict]) -> dict:
    modules: dict[str, dict] = {}
    for r in results:
        m = modules.setdefault(r["file"], {"killed": 0, "survived": 0, "equivalent": 0, "stale": 0})
        m[r["status"]] += 1
    for m in modules.values():
        live = m["killed"] + m["survived"]
        m["kill_ratio"] = round(m["killed"] / live, 4) if live else None
    return modules


def write_json(path: Path, payload: dict, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        sys.exit(f"{path} exists; pass --overwrite to replace it")
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)  # all or nothing


def markdown(payload: dict) -> str:
    """The results of a run (its JSON) as the Markdown tables of docs/mutation-kernels.md."""
    out = ["| module | killed | survived | equivalent (excluded) | stale | kill ratio |",
           "|---|---|---|---|---|---|"]
    for name, m in sorted(payload["modules"].items()):
        ratio = "-" if m["kill_ratio"] is None else f"{100 * m['kill_ratio']:.0f} %"
        counts = " | ".join(str(m[k]) for k in ("killed", "survived", "equivalent", "stale"))
        out.append(f"| `{name}` | {counts} | {ratio} |")
    out += ["", "| id | status | change | why plausible |", "|---|---|---|---|"]
    for r in payload["mutants"]:
        change = f"`{r['original'].strip()}` -> `{r['replacement'].strip()}`"
        change = " ".join(change.split()).replace("|", "\\|")  # one line; pipes escaped
        out.append(f"| {r['id']} | {r['status']} | {change} | {r['why']} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", metavar="ID", help="run only these mutants")
    ap.add_argument("--list", action="store_true", help="check the snippets, list the mutants, run nothing")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant (default 900)")
    ap.add_argument("--json", type=Path, help="write the results here (refuses to replace a file)")
    ap.add_argument("--overwrite", action="store_true", help="let --json replace an existing file")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    ap.add_argument("--markdown", type=Path, metavar="JSON", help="print a results file as Markdown")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0

    ids = [m.id for m in MUTANTS]
    if len(set(ids)) != len(ids):
        sys.exit("duplicate mutant ids")
    chosen = [m for m in MUTANTS if not args.only or m.id in args.only]
    unknown = set(args.only or ()) - set(ids)
    if unknown:
        sys.exit(f"unknown mutant ids: {sorted(unknown)}")

    started = time.time()
    if not args.list and not args.no_baseline:
        # One baseline per environment: a mutant's tests must pass unmutated on the code path it runs.
        live = [m for m in chosen if not m.equivalent]
        for env in dict.fromkeys(m.env for m in live):
            tests = list(dict.fromkeys(t for m in live if m.env == env for t in m.tests))
            base = run_one(type(chosen[0])("baseline", "", "", "", tuple(tests), "", "", env), args.timeout,
                           baseline=True)
            label = " ".join(f"{k}={v}" for k, v in env) or "default environment"
            print(f"baseline ({label}): {base['status']} in {base['seconds']:.0f} s ({base['detail']})",
                  flush=True)
            if base["status"] != "survived":
                sys.exit("the unmutated checkout fails these tests: fix that first")

    results = []
    for m in chosen:
        row = {"id": m.id, "file": m.file, "original": m.original, "replacement": m.replacement,
               "tests": list(m.tests), "why": m.why, "env": dict(m.env)}
        count = snippet_count(m)
        if count == 0:
            row.update(status="stale", detail="original snippet not found", seconds=0.0)
        elif count > 1:
            row.update(status="stale", detail=f"original snippet found {count} times (must be unique)",
                       seconds=0.0)
        elif m.equivalent:
            row.update(status="equivalent", detail=m.equivalent, seconds=0.0)
        elif args.list:
            row.update(status="listed", detail="", seconds=0.0)
        else:
            row.update(run_one(m, args.timeout))
        results.append(row)
        print(f"{m.id:10} {m.file:32} {row['status']:10} {row['seconds']:6.0f} s  {row['detail'][:90]}",
              flush=True)

    if args.list:
        return 1 if any(r["status"] == "stale" for r in results) else 0
    modules = summarise(results)
    print("\nmodule                            killed survived equivalent stale  kill ratio")
    for name, m in sorted(modules.items()):
        ratio = "-" if m["kill_ratio"] is None else f"{100 * m['kill_ratio']:.0f} %"
        print(f"{name:32} {m['killed']:7} {m['survived']:8} {m['equivalent']:10} {m['stale']:5}  {ratio:>10}")
    seconds = time.time() - started
    print(f"\n{len(results)} mutants in {seconds / 60:.1f} min")
    if args.json:
        write_json(args.json, {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                               "numba_num_threads": os.environ.get("NUMBA_NUM_THREADS", "1"),
                               "seconds": round(seconds), "modules": modules, "mutants": results},
                   args.overwrite)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
