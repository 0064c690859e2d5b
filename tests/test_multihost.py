"""A topology spread over three "machines": network namespaces joined by a bridge.

The test creates its own namespaces (unique names), a bridge in the hub namespace
and one veth pair per other namespace, with 10.x addresses only inside them; the
root namespace is never touched. The queue host runs in the hub, two reader
replicas in "alpha" and the consumer in "beta", each started with
``qpipe node FILE NAME --replica I`` through ``ip netns exec``. Everything is
stopped by PID and the links and namespaces are deleted in a finally.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _procs import Proc, digits_rows

pytestmark = [pytest.mark.netns, pytest.mark.timeout(60)]

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "topologies" / "data" / "digits"
PORT = 5555  # fixed, as remote queue hosts need; the hub namespace is new, so it is free


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {r.stderr.strip()}")
    return r


class Net:
    """Namespaces hub, alpha and beta on one 10.x.y.0/24 bridge in hub."""

    def __init__(self) -> None:
        suffix = secrets.token_hex(3)
        self.ns = {role: f"qp-{role}-{suffix}" for role in ("hub", "alpha", "beta")}
        net = f"10.{random.randint(64, 250)}.{random.randint(0, 255)}"
        self.addr = {"hub": f"{net}.1", "alpha": f"{net}.2", "beta": f"{net}.3"}
        self.created: list[str] = []
        self.links: list[tuple[str, str]] = []  # (namespace, link)

    def up(self) -> None:
        for ns in self.ns.values():
            _ip("netns", "add", ns)
            self.created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        hub = self.ns["hub"]
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        self.links.append((hub, "br0"))
        _ip("-n", hub, "addr", "add", f"{self.addr['hub']}/24", "dev", "br0")
        _ip("-n", hub, "link", "set", "br0", "up")
        for role in ("alpha", "beta"):
            ns, port = self.ns[role], f"to-{role}"
            # Both ends are created inside the test's namespaces, never in the root one.
            _ip("-n", hub, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            self.links.append((hub, port))
            _ip("-n", hub, "link", "set", port, "master", "br0")
            _ip("-n", hub, "link", "set", port, "up")
            _ip("-n", ns, "addr", "add", f"{self.addr[role]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def down(self) -> list[str]:
        problems = []
        for ns, link in reversed(self.links):
            r = _ip("-n", ns, "link", "del", link, check=False)
            if r.returncode != 0 and "Cannot find device" not in r.stderr:
                problems.append(f"ip -n {ns} link del {link}: {r.stderr.strip()}")
        for ns in reversed(self.created):
            r = _ip("netns", "del", ns, check=False)
            if r.returncode != 0:
                problems.append(f"ip netns del {ns}: {r.stderr.strip()}")
        left = set(_ip("netns", "list").stdout.split()) & set(self.created)
        if left:
            problems.append(f"namespaces left behind: {sorted(left)}")
        return problems


@pytest.fixture
def net():
    if sys.platform != "linux":
        pytest.skip("network namespaces are Linux only")
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces (ip netns add)")
    if shutil.which("ip") is None:
        pytest.skip("needs the `ip` command (iproute2)")
    n = Net()
    try:
        _ip("netns", "add", n.ns["hub"])
    except RuntimeError as e:
        pytest.skip(f"cannot create a network namespace here: {e}")
    _ip("netns", "del", n.ns["hub"])
    try:
        n.up()
        yield n
    finally:
        problems = n.down()
        assert not problems, "cleanup failed: " + "; ".join(problems)


@pytest.fixture
def nodes(procs):
    """``nodes(ns, args)``: ``ip netns exec NS python -m qpipe.cli node ARGS``, a Proc stopped at teardown."""

    def start(ns: str, args: list) -> Proc:
        return procs(["node", *args], prefix=["ip", "netns", "exec", ns])  # ip execs python: same PID

    return start


def topology(path: Path, net: Net, epochs: int) -> Path:
    path.write_text(textwrap.dedent(f"""
        [pipeline]
        name = "multihost"
        description = "digits across three network namespaces"
        default_timeout = 20.0

        [hosts.hub]
        address = "{net.addr['hub']}"
        [hosts.alpha]
        address = "{net.addr['alpha']}"
        [hosts.beta]
        address = "{net.addr['beta']}"

        [queue_hosts.qh]
        host = "hub"
        port = {PORT}

        [queues.instances]
        kind = "shuffle"
        capacity = 256
        min_after_dequeue = 32
        seed = 7
        dtypes = ["float32", "int64"]
        shapes = [[64], []]
        names = ["image", "label"]

        [nodes.reader]
        kind = "reader"
        host = "alpha"
        replicas = 2
        writes = ["instances"]
        [nodes.reader.params]
        files = {json.dumps(str(DIGITS / "train-*.csv"))}
        num_epochs = {epochs}
        seed = 1
        batch_size = 16
        components = [
          {{ name = "image", columns = "0:64", dtype = "float32" }},
          {{ name = "label", columns = "label", dtype = "int64" }},
        ]

        [nodes.count]
        kind = "consumer"
        host = "beta"
        reads = ["instances"]
        [nodes.count.params]
        batch_size = 32
        """).lstrip())
    return path


def test_nodes_in_three_namespaces_move_every_item_through_one_queue_host(tmp_path, net, nodes):
    rows, labels = digits_rows()
    epochs = 2
    topo = topology(tmp_path / "multihost.toml", net, epochs)

    qh = nodes(net.ns["hub"], [topo, "qh"])
    address = qh.wait_for(r"^QPIPE-READY (.*)", stream="out").group(1)  # a handshake: the host is bound
    assert address == f"tcp://{net.addr['hub']}:{PORT}"
    assert os.readlink(f"/proc/{qh.pid}/ns/net") != os.readlink("/proc/self/ns/net")

    count = nodes(net.ns["beta"], [topo, "count"])  # waits for items (timeout 20 s)
    readers = [nodes(net.ns["alpha"], [topo, "reader", "--replica", str(i)]) for i in range(2)]

    for r in readers:
        assert r.wait() == 0, r.output
    assert count.wait() == 0, count.output
    sent = [r.results()["records"] for r in readers]
    assert sum(sent) == epochs * rows and all(sent), sent
    got = count.results()
    assert got["consumed"] == {"instances": epochs * rows}, count.output
    assert got["labels"] == {k: epochs * v for k, v in sorted(labels.items())}
    assert re.search(r"INFO consumed instances: %d" % (epochs * rows), count.output)

    qh.popen.send_signal(signal.SIGTERM)
    assert qh.wait(10) == 0, qh.output
    assert "Traceback" not in qh.output
