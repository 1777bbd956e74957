"""Figure 4: Snakemake overhead of the default DAG - dry-run time, no-op rerun time (target:
under 5 s each) - and the end-to-end time of the default run (`snakemake --cores 2`), in a
temporary copy of the workflow made as tests/conftest.copy_workflow makes it. Dry runs and
no-op reruns are timed as the machine is and with `scontrol` answering at once (see
fast_probe_dir: the installed SLURM executor plugin asks SLURM for its configuration whenever
Snakemake starts).

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


def fast_probe_dir():
    """A directory with an `scontrol` that fails at once. The SLURM executor plugin runs
    `scontrol show config` when Snakemake loads it (every call, whatever the executor); with a
    SLURM client installed but no controller reachable that call waits 9 s here. Put first
    on PATH, this gives the time of a machine without SLURM (or with a controller that answers)."""
    fake = Path(tempfile.mkdtemp(prefix="fake-scontrol-"))
    (fake / "scontrol").write_text("#!/bin/sh\nexit 1\n")
    (fake / "scontrol").chmod(0o755)
    return fake


def timed_snakemake(workdir, *args, fake=None):
    path = f"{fake}:" if fake else ""
    env = {"PATH": f"{path}{bl.BIN}:/usr/bin:/bin", "HOME": str(Path.home()), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run(
        [str(bl.BIN / "snakemake"), *args], cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"snakemake {' '.join(args)} failed:\n{done.stdout[-4000:]}")
    return seconds, done.stdout


def probe_seconds():
    """How long `scontrol show config` takes here (None without a SLURM client)."""
    import shutil

    if not shutil.which("scontrol"):
        return None
    start = time.perf_counter()
    subprocess.run(["scontrol", "show", "config"], capture_output=True, timeout=60)
    return time.perf_counter() - start


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

    fake = fast_probe_dir()
    result["scontrol_probe_s"] = probe_seconds()

    def series(name, *snakemake_args, check=None):
        for label, where in (("", None), ("_fast_probe", fake)):
            times = []
            for _ in range(args.repeats):
                seconds, log = timed_snakemake(workdir, *snakemake_args, fake=where)
                if check and check not in log:
                    raise RuntimeError(f"expected '{check}' from snakemake {' '.join(snakemake_args)}:\n{log[-3000:]}")
                times.append(seconds)
            result[name + label + "_s"] = {"median": statistics.median(times), "all": times}
            what = " (scontrol answering at once)" if where else ""
            print(f"{name.replace('_', ' ')}{what} ({len(times)}x): median {statistics.median(times):.2f} s", flush=True)

    series("dry_run", "-n", "--cores", "2")
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
        # the default run's estimate and measured peak, for estimator_accuracy.py
        keep = args.out.parent / "default-run"
        keep.mkdir(parents=True, exist_ok=True)
        for name in ("memory.json", "train_settings.json", "train/done.json"):
            src = workdir / "results" / "demo" / name
            if src.is_file():
                (keep / Path(name).name).write_text(src.read_text())
        model = next((workdir / "resources" / "models").glob("*/files"), None)
        if model:
            import shutil

            shutil.copytree(model, keep / "model", dirs_exist_ok=True)
            bl.write_json(keep / "run.json", {"settings": str(keep / "train_settings.json"), "model_files": str(keep / "model"), "path": "ours"})
        series("noop_rerun", "--cores", "2", check="Nothing to be done")
        series("dry_run_after_run", "-n", "--cores", "2")
    result["load_after"] = bl.load_average()
    bl.write_json(args.out, result)
    if not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{bl.machine()}; load {result['load_before']} -> {result['load_after']}; results: {args.out}")
    return result


if __name__ == "__main__":
    main()
