"""Figure 4: Snakemake overhead of the default DAG - dry-run time, no-op rerun time (target:
under 5 s each) - and the end-to-end time of the default run (`snakemake --cores 2`), in a
temporary copy of the workflow made as tests/conftest.copy_workflow makes it.

    python bench/snakemake_overhead.py              # the figure in BENCHMARKS.md
    python bench/snakemake_overhead.py --skip-run   # dry runs only (no training)
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib as bl

sys.path.insert(0, str(bl.REPO / "tests"))
from conftest import copy_workflow  # noqa: E402


def timed_snakemake(workdir, *args):
    env = {"PATH": f"{bl.BIN}:/usr/bin:/bin", "HOME": str(Path.home()), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run(
        [str(bl.BIN / "snakemake"), *args], cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"snakemake {' '.join(args)} failed:\n{done.stdout[-4000:]}")
    return seconds, done.stdout


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="dry runs and no-op reruns each (median reported)")
    p.add_argument("--skip-run", action="store_true", help="only time the dry run of a fresh copy")
    p.add_argument("--keep", action="store_true", help="keep the temporary copy")
    p.add_argument("--out", type=Path, default=bl.DEFAULT_WORK / "snakemake_overhead.json")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="shardtune-bench-")
    workdir = copy_workflow(Path(tmp) / "wf")
    result = {"machine": bl.machine(), "workdir": str(workdir), "load_before": bl.load_average()}

    dry = [timed_snakemake(workdir, "-n", "--cores", "2")[0] for _ in range(args.repeats)]
    result["dry_run_s"] = {"median": statistics.median(dry), "all": dry}
    print(f"dry run (fresh copy, {len(dry)}x): median {statistics.median(dry):.2f} s", flush=True)
    if not args.skip_run:
        seconds, log = timed_snakemake(workdir, "--cores", "2")
        result["end_to_end_s"] = seconds
        result["end_to_end_load_before"] = result["load_before"]
        print(f"end to end (snakemake --cores 2): {seconds:.0f} s", flush=True)
        bench_dir = workdir / "benchmarks"
        result["jobs_s"] = {
            str(p.relative_to(bench_dir)): float(p.read_text().splitlines()[1].split("\t")[0])
            for p in sorted(bench_dir.rglob("*.tsv"))
        }
        noop = []
        for _ in range(args.repeats):
            seconds, log = timed_snakemake(workdir, "--cores", "2")
            if "Nothing to be done" not in log:
                raise RuntimeError(f"the rerun was not a no-op:\n{log[-3000:]}")
            noop.append(seconds)
        result["noop_rerun_s"] = {"median": statistics.median(noop), "all": noop}
        print(f"no-op rerun ({len(noop)}x): median {statistics.median(noop):.2f} s", flush=True)
        dry_done = [timed_snakemake(workdir, "-n", "--cores", "2")[0] for _ in range(args.repeats)]
        result["dry_run_after_run_s"] = {"median": statistics.median(dry_done), "all": dry_done}
        print(f"dry run after the run ({len(dry_done)}x): median {statistics.median(dry_done):.2f} s", flush=True)
    result["load_after"] = bl.load_average()
    bl.write_json(args.out, result)
    if not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{bl.machine()}; load {result['load_before']} -> {result['load_after']}; results: {args.out}")
    return result


if __name__ == "__main__":
    main()
