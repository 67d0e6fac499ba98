"""Start N local processes of one multi-process JAX run (multi-host training on one machine).

Usage:

    python tools/launch_local.py --num_processes 2 --devices_per_process 2 -- \\
        train.py --config configs/tiny.py --workdir /tmp/w

Each process gets ``JAX_COORDINATOR_ADDRESS`` (127.0.0.1 and a free port, process 0 serves it),
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``, ``JAX_PLATFORMS=cpu`` and ``JAX_NUM_CPU_DEVICES``, so
``jax.distributed`` joins them into one run over ``num_processes * devices_per_process`` CPU
devices, exactly as the hosts of a TPU pod slice or GPU cluster join (docs/multihost.md). A
command whose first word ends in ``.py`` runs with this Python interpreter.

Every output line is prefixed with ``[process id]``. When a process fails, the others are killed
5 s later (they would wait for it forever in the next collective) and the launcher exits with its
status.
Ctrl-C (or SIGTERM) sends SIGTERM to every process: training saves one step on all of them and
stops, as on a preempted TPU VM; a second Ctrl-C kills them.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

FAILURE_GRACE_S = 5.0  # after one process failed, the others get this long to exit


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: dict[str, str], *, address: str, num_processes: int, process_id: int,
                devices_per_process: int) -> dict[str, str]:
    """The environment of process ``process_id``: ``base`` plus the JAX multi-process setup."""
    return {**base, "JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": str(num_processes),
            "JAX_PROCESS_ID": str(process_id), "JAX_PLATFORMS": "cpu",
            "JAX_NUM_CPU_DEVICES": str(devices_per_process), "PYTHONUNBUFFERED": "1"}


def _forward(index: int, stream, lock: threading.Lock) -> None:
    for line in iter(stream.readline, b""):
        with lock:
            sys.stdout.write(f"[{index}] {line.decode(errors='replace')}")
            sys.stdout.flush()
    stream.close()


def _signal_all(procs: Sequence[subprocess.Popen], sig: int) -> None:
    for p in procs:
        if p.poll() is None:
            try:  # the process group: grain workers and other children too
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass


def launch(command: Sequence[str], *, num_processes: int, devices_per_process: int,
           port: int | None = None) -> int:
    """Runs ``command`` as ``num_processes`` processes; returns the exit status (0: all ok)."""
    if command and command[0].endswith(".py"):
        command = [sys.executable, *command]
    address = f"127.0.0.1:{port or free_port()}"
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    threads = []
    for i in range(num_processes):
        env = process_env(dict(os.environ), address=address, num_processes=num_processes,
                          process_id=i, devices_per_process=devices_per_process)
        p = subprocess.Popen(list(command), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        print(f"launch_local: process {i} of {num_processes}: pid {p.pid} "
              f"(coordinator {address})", file=sys.stderr, flush=True)
        t = threading.Thread(target=_forward, args=(i, p.stdout, lock), daemon=True)
        t.start()
        threads.append(t)

    interrupts = []

    def on_signal(sig: int, _frame) -> None:
        interrupts.append(sig)
        # SIGTERM, whatever arrived: training treats it as a preemption, and every process stops
        # at one agreed step and saves it (a Ctrl-C would reach them at different steps).
        _signal_all(procs, signal.SIGTERM if len(interrupts) == 1 else signal.SIGKILL)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    first_failure: int | None = None  # the status of the process that failed first
    try:
        while None in (codes := [p.poll() for p in procs]):
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed and not interrupts:
                i, code = failed[0]
                first_failure = code
                # A grace period: after a preemption every process exits on its own.
                deadline = time.monotonic() + FAILURE_GRACE_S
                while time.monotonic() < deadline and None in [p.poll() for p in procs]:
                    time.sleep(0.05)
                if None in [p.poll() for p in procs]:
                    print(f"launch_local: process {i} failed ({_describe(code)}): killing the "
                          "others", file=sys.stderr, flush=True)
                    _signal_all(procs, signal.SIGKILL)
                break
            time.sleep(0.05)
        for p in procs:
            p.wait()
        for t in threads:
            t.join(timeout=5)
        codes = [p.returncode for p in procs]
        for i, code in enumerate(codes):
            if code != 0:
                print(f"launch_local: process {i}: {_describe(code)}", file=sys.stderr)
        if first_failure is None:
            first_failure = next((c for c in codes if c != 0), 0)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return first_failure if first_failure >= 0 else 128 - first_failure  # 128 + signal


def _describe(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        sys.exit("usage: launch_local.py --num_processes N --devices_per_process D -- "
                 "COMMAND [ARGS...] (the '--' is required)")
    cut = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=1,
                        help="CPU devices of each process (jax_num_cpu_devices)")
    parser.add_argument("--port", type=int, default=None,
                        help="coordinator port on 127.0.0.1 (default: a free one)")
    args = parser.parse_args(argv[:cut])
    command = argv[cut + 1:]
    if not command:
        parser.error("no command after '--'")
    if args.num_processes < 1 or args.devices_per_process < 1:
        parser.error("--num_processes and --devices_per_process must be >= 1")
    return launch(command, num_processes=args.num_processes,
                  devices_per_process=args.devices_per_process, port=args.port)


if __name__ == "__main__":
    sys.exit(main())
