"""Run this app on a real local Flower deployment: one SuperLink and three SuperNodes, each its own
process on 127.0.0.1, then ``flwr run`` against it. Exits 0 when the run finished all its rounds.

    python run_deployment.py --rounds 3 --result /tmp/flower_app_result.json

Every process runs with ``--insecure`` (plain HTTP on the loopback interface only) and without Flower's
runtime dependency installation: the app runs in the current environment, which must have
``flsec[flower]`` installed. Each process gets its own FLWR_HOME in a temporary directory, so the
user's ``~/.flwr`` is never touched; all processes are stopped on exit. Flower's usage telemetry and update
check are off unless FLWR_TELEMETRY_ENABLED is set.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

APP = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tool(name: str) -> str:
    path = BIN / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        sys.exit(f"error: `{name}` not found; install flsec[flower] into this environment")
    return found


def wait_healthy(port: int, procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a Flower process exited during start-up; see the logs")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the SuperLink did not answer on 127.0.0.1:{port} within {timeout:.0f} s")


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each process group this script started, SIGKILL what is left after 10 s."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--supernodes", type=int, default=3)
    ap.add_argument("--result", type=Path, default=None, help="where the ServerApp writes its MA/ASR per round")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds before the run is declared stuck")
    ap.add_argument("--run-config", default="", help="extra run-config overrides, e.g. 'aggregator=\"krum\"'")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="flsec-flower-deploy-"))
    result = (args.result or Path(tempfile.gettempdir()) / f"{work.name}-result.json").resolve()
    result.unlink(missing_ok=True)
    port = free_port()
    env = {"FLWR_TELEMETRY_ENABLED": "0", **os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_DISABLE_UPDATE_CHECK": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}

    def spawn(name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        home = work / name
        home.mkdir()
        log = (work / f"{name}.log").open("wb")
        print(f"[deploy] {name}: {' '.join(cmd)}", flush=True)
        return subprocess.Popen(cmd, env={**env, "FLWR_HOME": str(home)}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(spawn("superlink", [tool("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port",
                                         str(port), "--disable-runtime-dependency-installation"]))
        wait_healthy(port, procs, 60)
        for i in range(args.supernodes):
            procs.append(spawn(f"supernode{i}", [
                tool("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                "--node-config", f"partition-id={i} num-partitions={args.supernodes}",
                "--host", "127.0.0.1", "--port", str(free_port())]))
        cli_home = work / "cli"
        cli_home.mkdir()
        (cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "deployment"\n\n[superlink.deployment]\naddress = "127.0.0.1:{port}"\n'
            "insecure = true\n", encoding="utf-8")
        overrides = f'num-server-rounds={args.rounds} result-path="{result}" {args.run_config}'.strip()
        cmd = [tool("flwr"), "run", str(APP), "deployment", "--run-config", overrides, "--stream"]
        print(f"[deploy] {' '.join(cmd)}", flush=True)
        t0 = time.monotonic()
        run = subprocess.Popen(cmd, env={**env, "FLWR_HOME": str(cli_home)}, start_new_session=True)
        procs.append(run)
        deadline = t0 + args.timeout
        while not result.exists() and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                raise RuntimeError("a Flower process failed; logs in " + str(work))
            time.sleep(0.5)
        if not result.exists():
            raise RuntimeError(f"no result after {args.timeout:.0f} s; logs in {work}")
        rounds = json.loads(result.read_text())["rounds"]
        print(f"[deploy] {len(rounds)} rounds in {time.monotonic() - t0:.1f} s on {args.supernodes} SuperNodes: "
              + ", ".join(f"r{r['round']} MA {r['ma']:.3f} ASR {r['asr']:.3f}" for r in rounds), flush=True)
        if len(rounds) != args.rounds:
            raise RuntimeError(f"{len(rounds)} rounds finished, {args.rounds} expected; logs in {work}")
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        for log in sorted(work.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-15:]
            print(f"--- {log.name}\n" + "\n".join(tail), file=sys.stderr)
        stop(procs)
        return 1
    finally:
        stop(procs)
    shutil.rmtree(work, ignore_errors=True)  # kept (with the logs) only when the run failed
    if args.result is None:
        result.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
