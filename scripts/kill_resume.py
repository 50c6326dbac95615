"""Kill a long run with SIGKILL at chosen points, run the same command again, and time what
each kill cost: the acceptance check that ./run.sh survives its machine.

    python scripts/kill_resume.py --log runs/kill_resume.log \
        --kill teachers/lite2_224px_f1/checkpoint.pth:3:90 --kill runs/pipeline/distill/checkpoint.pth:5:60 \
        -- ./run.sh

A kill point FILE:K:S fires S seconds after the K-th time FILE is written (a checkpoint: every
--checkpoint-every steps and at each epoch end); the training since the last write is lost. After
each kill the same command starts again; the last run goes to its end. A second copy of the
command is started once while the first runs: it must be refused at once (the run's lock).
Every line the runs print is logged with the time since the start; the summary gives, per kill,
the training lost (kill time minus the last checkpoint) and the restart cost (from the restart
to the first step past the checkpoint: set-up, data and caches, soft targets).
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kill", action="append", default=[], help="FILE:K:SECONDS (in order)")
    ap.add_argument("--log", required=True, help="where every line goes, with its time")
    ap.add_argument("--no-concurrent-check", action="store_true", help="skip the second-copy check")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- the command, e.g. ./run.sh")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    kills = []
    for spec in args.kill:
        path, count, seconds = spec.rsplit(":", 2)
        kills.append((Path(path), int(count), float(seconds)))
    log = open(args.log, "a", buffering=1)
    t_start = time.time()

    def note(text: str) -> None:
        log.write(f"[{time.time() - t_start:8.1f} s] {text}\n")

    summary = []
    for attempt, kill in enumerate(kills + [None]):
        note(f"=== run {attempt + 1}: {' '.join(command)}" + (f" (kill: {kill})" if kill else " (to the end)"))
        t_run = time.time()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        started = threading.Event()  # set once the pipeline has taken its locks and starts its stages
        reader = threading.Thread(target=pump, args=(proc, note, started), daemon=True)
        reader.start()
        if attempt == 0 and not args.no_concurrent_check:
            check_second_copy(command, note, started)
        if kill is None:
            rc = proc.wait()
            reader.join()
            note(f"=== run {attempt + 1} ended with exit code {rc} after {time.time() - t_run:.0f} s")
            summary.append(f"final run: exit {rc}, {time.time() - t_run:.0f} s")
            break
        path, count, seconds = kill
        writes, last_mtime, last_write, kill_at = 0, mtime(path), None, None
        while proc.poll() is None:
            now_mtime = mtime(path)
            if now_mtime is not None and now_mtime != last_mtime:
                writes, last_mtime, last_write = writes + 1, now_mtime, time.time()
                note(f"--- {path} written ({writes})")
                if writes == count:
                    kill_at = last_write + seconds  # later writes do not postpone it
            if kill_at is not None and time.time() >= kill_at:
                break
            time.sleep(0.5)
        if proc.poll() is not None:
            note(f"=== run {attempt + 1} ended (exit {proc.returncode}) before its kill point: stopping")
            sys.exit(1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join(timeout=10)
        lost = time.time() - last_write
        note(f"=== SIGKILL run {attempt + 1} after {time.time() - t_run:.0f} s, {lost:.0f} s after the last "
             f"checkpoint write of {path}")
        summary.append(f"kill {attempt + 1} at {path} (write {count}): {lost:.0f} s of training since the checkpoint")
    note("=== summary: " + "; ".join(summary) + f"; total wall {time.time() - t_start:.0f} s")


PROGRESS = re.compile(r"\d+%\|")  # tqdm bars: not logged, only the lines that say something


def pump(proc, note, started) -> None:
    buffer = b""
    for chunk in iter(lambda: proc.stdout.read1(4096), b""):
        buffer += chunk
        *lines, buffer = re.split(rb"[\r\n]", buffer)
        for raw in lines:
            line = raw.decode(errors="replace").rstrip()
            if line and not PROGRESS.search(line):
                note(line)
                if line.startswith("=== decode data"):
                    started.set()


def check_second_copy(command, note, started) -> None:
    """A second copy started while the first holds its folders must be refused at once (after
    the first one's set-up: two installs into one .venv at once would be a test of pip)."""
    if not started.wait(timeout=1800):
        note("--- second copy: not started (the first run never reached its stages)")
        return
    time.sleep(5)
    t0 = time.time()
    second = subprocess.run(command, capture_output=True, text=True, timeout=600)
    last = (second.stderr.strip().splitlines() or [""])[-1]
    note(f"--- second copy: exit {second.returncode} after {time.time() - t0:.0f} s: {last}")


def mtime(path: Path):
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


if __name__ == "__main__":
    main()
