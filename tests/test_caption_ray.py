"""`pixlocal caption --ray` on a Ray cluster the test starts on this machine (loopback only,
2 CPUs, no dashboard, shut down at the end): 2 workers, one of them killed mid-run, give the
records of one process; a driver killed mid-run and rerun with --resume loses nothing and
writes nothing twice."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from pixlocal.cli.app import app
from test_caption_scale import make_tree
from typer.testing import CliRunner

N = 40
GEN = ["--max-tokens", "12", "--dtype", "float32"]


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance for this module: its servers on 127.0.0.1 only (node address
    = loopback), 2 CPUs, no dashboard; its address for drivers in other processes."""
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    os.environ.pop("RAY_ADDRESS", None)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read when ray is imported
    ray = pytest.importorskip("ray")
    tmp = tempfile.mkdtemp(prefix="pxray", dir="/tmp")  # short: Ray's socket paths have a limit
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False,
             log_to_driver=False, logging_level="ERROR", _temp_dir=tmp)
    try:
        address = ray.get_runtime_context().gcs_address
        assert address.startswith("127.0.0.1:"), address
        open_ = listening()
        assert open_ and all(ipaddress.ip_address(a).is_loopback for a in open_), open_
        yield address
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_ckpt):
    """40 images (odd names, nested folders) and the records of one local process."""
    root = tmp_path_factory.mktemp("raycap")
    make_tree(root / "pics", n=N)
    one = root / "one.jsonl"
    r = CliRunner().invoke(app, ["caption", str(root / "pics"), "-o", str(one), "-m",
                                 str(tiny_ckpt), *GEN])
    assert r.exit_code == 0, r.stderr
    return root / "pics", str(tiny_ckpt), {x["path"]: x for x in records(one)}


def _descendants() -> dict[int, bytes]:
    """pid -> command line of the processes below this one (the cluster's)."""
    parent, title = {}, {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
                parent[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
                title[int(d)] = Path(f"/proc/{d}/cmdline").read_bytes()
            except (OSError, ValueError, IndexError):
                continue
    me = os.getpid()

    def mine(pid: int) -> bool:
        while pid > 1:
            pid = parent.get(pid, 1)
            if pid == me:
                return True
        return False

    return {p: t for p, t in title.items() if mine(p)}


def listening() -> list[str]:
    """The addresses the cluster's processes listen on (TCP, from /proc)."""
    inodes = set()
    for pid in _descendants():
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    found = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A" or f[9] not in inodes:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(f[1].split(":")[0])
            words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # host order
            a = ipaddress.ip_address(words if v6 else raw[::-1])
            found.append(str(getattr(a, "ipv4_mapped", None) or a))
    return found


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []


def same_as_one_process(out: Path, single: dict) -> None:
    got = records(out)
    assert sorted(x["path"] for x in got) == sorted(single)  # one record per image
    for x in got:
        assert {k: v for k, v in x.items() if k != "seconds"} == \
               {k: v for k, v in single[x["path"]].items() if k != "seconds"}


def driver(pics: Path, out: Path, model: str, address: str, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "pixlocal.cli.app", "caption", str(pics), "-o", str(out),
           "-m", model, *GEN, "--ray", address, "--workers", "2", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def wait_for(proc: subprocess.Popen, out: Path, n: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while len(records(out)) < n:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {n} records: {proc.communicate()}")
        time.sleep(0.005)


def caption_workers(busy: bool = False) -> list[int]:
    """Pids of the cluster's CaptionWorker processes; busy: those captioning now (Ray titles a
    process after the method it runs)."""
    want = b"ray::CaptionWorker.caption" if busy else b"ray::CaptionWorker"
    return [p for p, t in _descendants().items() if t.startswith(want)]


def test_two_workers_one_killed_mid_run_give_the_records_of_one_process(cluster, job,
                                                                       tmp_path):
    """This process is the driver (--ray uses the Ray instance it is connected to); a thread
    kills one of the two workers with SIGKILL once 5 records are written."""
    pics, model, single = job
    out = tmp_path / "ray.jsonl"
    killed: list[tuple[int, int]] = []  # (pid, records written when it was killed)

    def killer() -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if len(records(out)) >= 5 and (pids := caption_workers(busy=True)):
                os.kill(pids[0], signal.SIGKILL)
                killed.append((pids[0], len(records(out))))
                return
            time.sleep(0.005)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    r = CliRunner().invoke(app, ["caption", str(pics), "-o", str(out), "-m", model, *GEN,
                                 "--ray", "--workers", "2"])
    t.join(timeout=5)
    assert r.exit_code == 0, r.stderr
    assert killed and killed[0][1] < N, f"no worker was killed mid-run: {killed}"
    assert "on 2 Ray worker(s)" in r.stderr and "a Ray worker died" in r.stderr
    assert f"captioned {N}, failed 0" in r.stderr
    same_as_one_process(out, single)


def test_the_driver_killed_then_resumed_finishes_the_rest(cluster, job, tmp_path):
    pics, model, single = job
    out = tmp_path / "ray.jsonl"
    proc = driver(pics, out, model, cluster)
    wait_for(proc, out, 5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    before = records(out)
    assert 5 <= len(before) < N, "the driver was not killed mid-run"

    proc = driver(pics, out, model, cluster, "--resume")
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert f"skipped {len(before)}" in stderr
    assert records(out)[: len(before)] == before  # what the killed run recorded is kept
    same_as_one_process(out, single)


def usage(*args: str):
    r = CliRunner().invoke(app, ["caption", *args])
    errors = [x for x in r.stderr.splitlines() if x.startswith("error")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    return r.exit_code, errors[0]


def test_ray_options_fail_in_one_line(tmp_path, monkeypatch):
    pics = tmp_path / "pics"
    make_tree(pics, n=10)
    code, line = usage(str(pics), "--workers", "2")
    assert code == 2 and "--workers" in line and "--ray" in line
    code, line = usage(str(pics), "--ray=pics/")
    assert code == 2 and "'pics/' is not a Ray address" in line
    # a bare --ray takes no folder as its address: the folder is one of the inputs
    code, line = usage("--ray", str(tmp_path / "nope"), str(pics))
    assert code == 2 and "nope: no such file or directory" in line
    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    code, line = usage(str(pics), "--ray", f"127.0.0.1:{port}")
    assert code == 1 and "nothing answers there" in line and "ray start --head" in line
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed
    code, line = usage(str(pics), "--ray", "--workers", "2")
    assert code == 1 and "pip install 'pixlocal[ray]'" in line
