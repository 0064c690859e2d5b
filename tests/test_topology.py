import dataclasses
import re
from pathlib import Path

import pytest

from qpipe.topology import (
    KIND_PARAMS,
    READER_COMPONENT,
    HostSpec,
    NodeSpec,
    QueueHostSpec,
    QueueSpec,
    Topology,
    TopologyError,
    load,
    loads,
)

README = Path(__file__).resolve().parent.parent / "topologies" / "README.md"

BASE = """\
[pipeline]
name = "t"

[queues.inst]
kind = "shuffle"
capacity = 100
min_after_dequeue = 10
dtypes = ["float32", "int64"]
shapes = [[4], []]

[nodes.reader]
kind = "reader"
writes = ["inst"]
[nodes.reader.params]
files = "data/*.csv"
components = [
  { name = "x", columns = "0:4", dtype = "float32" },
  { name = "y", columns = 4, dtype = "int64" },
]

[nodes.sink]
kind = "consumer"
reads = ["inst"]
"""


def write(tmp_path, text, name="topo.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def error(tmp_path, text, **kw) -> TopologyError:
    p = write(tmp_path, text)
    with pytest.raises(TopologyError) as ei:
        load(p, **kw)
    return ei.value


def expect(tmp_path, text, key, *fragments, **kw):
    """Loading fails with a problem at ``key`` whose message names the file and key and has ``fragments``."""
    err = error(tmp_path, text, **kw)
    hits = [p for p in err.problems if p.key == key]
    assert hits, f"no problem at {key!r}; got:\n{err}"
    line = str(hits[0])
    assert "topo.toml" in line and key in line, line
    assert "topo.toml" in str(err) and key in str(err)
    for f in fragments:
        assert f in line, f"{f!r} not in {line!r}"
    assert err.path.endswith("topo.toml")
    return hits[0]


# -- valid files --------------------------------------------------------------------------


def test_a_valid_file_loads_into_frozen_dataclasses(tmp_path):
    topo = load(write(tmp_path, BASE))
    assert isinstance(topo, Topology)
    assert topo.name == "t" and topo.path == (tmp_path / "topo.toml").resolve()
    assert topo.hosts["local"] == HostSpec("local", "127.0.0.1")
    assert topo.queue_hosts["default"] == QueueHostSpec("default", "local", "127.0.0.1", 0)
    q = topo.queue("inst")
    assert q == QueueSpec(name="inst", kind="shuffle", capacity=100, dtypes=("float32", "int64"),
                          shapes=((4,), ()), min_after_dequeue=10, host="default")
    r = topo.node("reader")
    assert isinstance(r, NodeSpec)
    assert (r.kind, r.replicas, r.host, r.device, r.gpus, r.threads, r.timeout) == (
        "reader", 1, "local", "cpu", (), 1, None)
    assert r.writes == ("inst",) and r.reads == ()
    assert r.params["format"] == "csv" and r.params["num_epochs"] == 1  # defaults filled in
    assert r.params["components"][0]["columns"] == "0:4"
    assert r.entry_point == "nodes.reader:main"
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.replicas = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        r.params["files"] = "other"  # type: ignore[index]
    d = r.params_dict()
    d["components"].append({})
    assert len(r.params["components"]) == 2


def test_every_key_round_trips(tmp_path):
    text = """\
[pipeline]
name = "full"
description = "all keys"
default_timeout = 12.5

[hosts.gpu1]
address = "10.0.0.7"

[queue_hosts.qa]
host = "gpu1"
port = 6000
max_message_size = "256MiB"

[queue_hosts.qb]
port = 6001
max_message_size = 1024

[queues.files]
kind = "fifo"
host = "qb"
capacity = 10
dtypes = ["string"]
external = true

[queues.seqs]
kind = "padding"
host = "qa"
capacity = 5
dtypes = ["int32", "float64"]
shapes = [[-1], [2, -1]]
names = ["tokens", "w"]

[nodes.train]
kind = "mypkg.train:main"
replicas = 2
host = "gpu1"
device = "gpu"
gpus = [1, 3]
gpu_memory_fraction = 0.5
threads = 4
timeout = inf
restart = "on-failure"
max_restarts = 5
reads = ["seqs"]
writes = []
[nodes.train.params]
lr = 0.1
layers = [64, 32]
nested = { a = 1 }

[nodes.feed]
kind = "mypkg.feed:main"
host = "gpu1"
device = "gpu"
gpus = 0
writes = ["seqs"]
"""
    topo = load(write(tmp_path, text))
    assert topo.default_timeout == 12.5 and topo.description == "all keys"
    assert list(topo.hosts) == ["local", "gpu1"]
    qa, qb = topo.queue_hosts["qa"], topo.queue_hosts["qb"]
    assert (qa.address, qa.bind_address, qa.max_message_size) == ("tcp://10.0.0.7:6000", "tcp://10.0.0.7:6000", 256 << 20)
    assert (qb.address, qb.max_message_size) == ("tcp://127.0.0.1:6001", 1024)
    seqs = topo.queue("seqs")
    assert seqs.shapes == ((None,), (2, None)) and seqs.names == ("tokens", "w")
    assert seqs.spec_kwargs()["shapes"] == [[None], [2, None]]
    assert topo.queue("files").external and topo.queue("files").shapes is None
    t = topo.node("train")
    assert (t.gpus, t.gpu_memory_fraction, t.threads, t.timeout, t.restart, t.max_restarts) == (
        (1, 3), 0.5, 4, None, "on-failure", 5)
    assert t.params["layers"] == (64, 32) and t.params["nested"]["a"] == 1
    assert t.entry_point == "mypkg.train:main" and not t.is_builtin
    assert topo.node("feed").gpus == (0,) and topo.node("feed").timeout == 12.5
    assert topo.queue_host_for("seqs") is qa
    assert topo.writers("seqs") == ("feed",) and topo.readers("seqs") == ("train",)
    assert list(topo.nodes) == ["train", "feed"]  # file order


def test_gpu_nodes_default_to_one_gpu_per_replica(tmp_path):
    text = BASE.replace('kind = "consumer"', 'kind = "consumer"\nreplicas = 3\ndevice = "gpu"')
    assert load(write(tmp_path, text)).node("sink").gpus == (0, 1, 2)


def test_relative_paths_resolve_against_the_file_not_the_working_directory(tmp_path, monkeypatch):
    sub = tmp_path / "topologies"
    sub.mkdir()
    topo = load(write(sub, BASE))
    monkeypatch.chdir(tmp_path)
    assert topo.base_dir == sub.resolve()
    assert topo.resolve_path(topo.node("reader").params["files"]) == sub.resolve() / "data/*.csv"
    assert topo.resolve_path("/abs/x.csv") == Path("/abs/x.csv")
    assert topo.resolve_path("~/x").is_absolute()


def test_loads_names_the_given_path_in_messages():
    topo = loads(BASE)
    assert topo.path is None and topo.base_dir == Path.cwd()
    with pytest.raises(TopologyError) as ei:
        loads(BASE.replace("capacity = 100", "capacity = 0"), path="inline.toml")
    assert str(ei.value).startswith("inline.toml:6: queues.inst.capacity:")


def test_lookups_of_unknown_names_suggest_the_right_one(tmp_path):
    topo = load(write(tmp_path, BASE))
    with pytest.raises(KeyError, match='did you mean "sink"'):
        topo.node("sinc")
    with pytest.raises(KeyError, match="inst"):
        topo.queue_host_for("nope")


def test_graph_text_shows_nodes_queues_and_flow(tmp_path):
    text = BASE.replace('kind = "reader"', 'kind = "reader"\nreplicas = 2')
    g = load(write(tmp_path, text)).graph_text()
    assert "pipeline t" in g
    assert "inst  shuffle  capacity 100, min_after_dequeue 10  on default" in g
    assert "items (float32[4], int64[])" in g
    assert "reader  reader x2, on local, cpu, 1 thread" in g
    assert "reader x2  --> inst [shuffle 100]  --> sink" in g
    assert "tcp://127.0.0.1:0" in g and "port picked at start" in g


def test_readme_example_loads_and_its_graph_text_is_what_the_readme_shows(tmp_path):
    blocks = re.findall(r"```toml\n(.*?)```", README.read_text(), re.S)
    topo = load(write(tmp_path, blocks[0], "digits.toml"))
    shown = re.findall(r"```text\n(.*?)```", README.read_text(), re.S)[0]
    actual = topo.graph_text().replace(str(topo.path), "/path/to/topologies/digits.toml")
    assert actual == shown


def test_readme_documents_every_param_of_every_schema():
    text = README.read_text()
    keys = [k for schema in KIND_PARAMS.values() if schema for k in schema] + list(READER_COMPONENT)
    missing = [k for k in keys if f"`{k}`" not in text]
    assert not missing


# -- mistakes -----------------------------------------------------------------------------


def test_toml_syntax_errors_name_the_file_and_line(tmp_path):
    err = error(tmp_path, BASE.replace('capacity = 100', 'capacity = = 100'))
    assert err.key is None
    assert str(err).endswith("topo.toml:6: TOML syntax error: Invalid value (column 12)")
    assert err.problems[0].line == 6


def test_a_file_that_is_not_utf8_is_reported(tmp_path):
    p = tmp_path / "topo.toml"
    p.write_bytes(b'[pipeline]\nname = "\xff"\n')
    with pytest.raises(TopologyError, match="topo.toml: is not UTF-8"):
        load(p)


def test_unknown_keys_suggest_the_closest_key(tmp_path):
    expect(tmp_path, BASE.replace('kind = "reader"', 'kind = "reader"\nreplica = 2'),
           "nodes.reader.replica", "unknown key", 'did you mean "replicas"?')
    expect(tmp_path, BASE + '\n[queue.extra]\nkind = "fifo"\n', "queue", 'did you mean "queues"?')
    p = expect(tmp_path, BASE.replace("capacity = 100", "capacity = 100\nzzz = 1"), "queues.inst.zzz",
               "the keys allowed here are kind, host, capacity")
    assert p.line == 7


def test_missing_required_keys_are_reported(tmp_path):
    expect(tmp_path, BASE.replace('name = "t"', ""), "pipeline.name", "missing")
    expect(tmp_path, BASE.replace("capacity = 100\n", ""), "queues.inst.capacity", "missing", "an integer")
    expect(tmp_path, BASE.replace('files = "data/*.csv"', ""), "nodes.reader.params.files", "missing")
    expect(tmp_path, "[nodes.a]\nkind = \"consumer\"\n", "pipeline", "missing")


def test_wrong_types_are_reported_with_the_fix(tmp_path):
    expect(tmp_path, BASE.replace("capacity = 100", 'capacity = "100"'), "queues.inst.capacity",
           'expected an integer, got "100"; remove the quotes')
    expect(tmp_path, BASE.replace('kind = "reader"', 'kind = "reader"\nreplicas = true'),
           "nodes.reader.replicas", "expected an integer, got true")
    expect(tmp_path, BASE.replace("capacity = 100", "capacity = 100.0"), "queues.inst.capacity",
           "expected an integer, got 100.0")
    expect(tmp_path, BASE.replace('reads = ["inst"]', 'reads = "inst"'), "nodes.sink.reads",
           'write ["inst"]')
    expect(tmp_path, BASE + '[nodes.sink.params]\nbatch_size = "64"\n', "nodes.sink.params.batch_size",
           'expected an integer, got "64"')
    expect(tmp_path, BASE.replace('[nodes.sink]', '[nodes.sink]\nthreads = "4"'), "nodes.sink.threads",
           "remove the quotes")


def test_unknown_node_kinds_list_the_known_kinds(tmp_path):
    expect(tmp_path, BASE.replace('kind = "consumer"', 'kind = "consumr"'), "nodes.sink.kind",
           'unknown node kind "consumr"', 'did you mean "consumer"?', "reader, feeder, trainer",
           '"package.module:function"')


def test_user_kinds_are_accepted_and_their_imports_checked_on_request(tmp_path):
    user = BASE.replace('kind = "consumer"', 'kind = "json:dumps"')
    assert load(write(tmp_path, user), check_imports=True).node("sink").kind == "json:dumps"
    missing = BASE.replace('kind = "consumer"', 'kind = "no_such_pkg_q.mod:main"')
    assert load(write(tmp_path, missing)).node("sink").entry_point == "no_such_pkg_q.mod:main"
    expect(tmp_path, missing, "nodes.sink.kind", 'cannot import module "no_such_pkg_q.mod"',
           "ModuleNotFoundError", check_imports=True)
    expect(tmp_path, BASE.replace('kind = "consumer"', 'kind = "json:dump_s"'), "nodes.sink.kind",
           'has no function "dump_s"', 'did you mean "dumps"?', check_imports=True)


def test_user_kind_params_are_free_form_but_builtin_params_are_checked(tmp_path):
    free = BASE.replace('kind = "consumer"', 'kind = "pkg.m:f"') + "[nodes.sink.params]\nanything = [1, 2]\n"
    assert load(write(tmp_path, free)).node("sink").params["anything"] == (1, 2)
    expect(tmp_path, BASE + "[nodes.sink.params]\nbatch_sise = 3\n", "nodes.sink.params.batch_sise",
           'did you mean "batch_size"?')
    expect(tmp_path, BASE.replace('files = "data/*.csv"', 'files = "a.csv"\nformat = "parquet"'),
           "nodes.reader.params.format", 'expected one of "csv", "npy", "fixed"')


def test_queues_nobody_writes_or_reads_are_reported_unless_external(tmp_path):
    orphan = '\n[queues.lost]\nkind = "fifo"\ncapacity = 1\ndtypes = ["int32"]\n'
    err = error(tmp_path, BASE + orphan)
    msgs = [str(p) for p in err.problems if p.key == "queues.lost"]
    assert len(msgs) == 2 and "topo.toml:25" in msgs[0]
    assert "no node writes to this queue" in msgs[0] and "external = true" in msgs[0]
    assert "no node reads this queue" in msgs[1]
    assert load(write(tmp_path, BASE + orphan + "external = true\n")).queue("lost").external


def test_reading_or_writing_an_unknown_queue_is_reported(tmp_path):
    expect(tmp_path, BASE.replace('reads = ["inst"]', 'reads = ["inst", "isnt"]'), "nodes.sink.reads[1]",
           'no queue named "isnt"', 'did you mean "inst"?')
    expect(tmp_path, BASE.replace('writes = ["inst"]', 'writes = ["inst", "inst"]'), "nodes.reader.writes[1]",
           'lists queue "inst" twice')


def test_unknown_host_and_queue_host_references_are_reported(tmp_path):
    expect(tmp_path, BASE.replace('[nodes.sink]', '[nodes.sink]\nhost = "lokal"'), "nodes.sink.host",
           'no host named "lokal"', 'did you mean "local"?', "[hosts.lokal]")
    expect(tmp_path, BASE.replace("capacity = 100", 'capacity = 100\nhost = "qh"'), "queues.inst.host",
           'no queue host named "qh"', "known: default")
    qhs = '[queue_hosts.a]\nport = 5000\n[queue_hosts.b]\nport = 5001\n[queue_hosts.c]\nhost = "nowhere"\n'
    err = error(tmp_path, qhs + BASE)
    assert any(p.key == "queues.inst.host" and "there are 3 queue hosts (a, b, c)" in p.message
               for p in err.problems)
    assert any(p.key == "queue_hosts.c.host" and 'no host named "nowhere"' in p.message for p in err.problems)


def test_reader_components_must_match_the_queues_it_writes(tmp_path):
    expect(tmp_path, BASE.replace('columns = 4, dtype = "int64"', 'columns = 4, dtype = "int32"'),
           "nodes.reader.params.components[1].dtype", 'component 1 ("y") is int32 here but int64 in queue "inst"',
           "queues.inst.dtypes[1]")
    expect(tmp_path, BASE.replace('columns = "0:4"', 'columns = "0:5"'),
           "nodes.reader.params.components[0].shape", "has shape [5] here but [4]")
    expect(tmp_path, BASE.replace('dtypes = ["float32", "int64"]\nshapes = [[4], []]',
                                  'dtypes = ["float32"]\nshapes = [[4]]'),
           "nodes.reader.params.components", "the reader makes items of 2 components but queue \"inst\" holds 1")


def test_reader_component_specs_are_checked(tmp_path):
    comps = '[\n  { name = "x", columns = "0:4", dtype = "float32" },\n  { name = "y", columns = 4, dtype = "int64" },\n]'
    def with_comps(new):
        return BASE.replace(comps, new)
    expect(tmp_path, with_comps('[{ columns = "0:4", dtype = "float32", shape = [3] }, { columns = 4, dtype = "int64" }]'),
           "nodes.reader.params.components[0].shape", "holds 3 values but columns give 4")
    expect(tmp_path, with_comps('[{ columns = "4:0", dtype = "float32" }, { columns = 4, dtype = "int64" }]'),
           "nodes.reader.params.components[0].columns", "is empty")
    expect(tmp_path, with_comps('[{ columns = "0:4", dtype = "float32" }, { columns = 4, dtype = "int64", default = 1.5 }]'),
           "nodes.reader.params.components[1].default", "1.5 is not a int64 value")
    expect(tmp_path, with_comps('[{ dtype = "float32" }]'), "nodes.reader.params.components[0].columns", "missing")
    expect(tmp_path, BASE.replace('files = "data/*.csv"', 'files = "data/*.csv"\nheader = false').replace(
        "columns = 4,", 'columns = "label",'), "nodes.reader.params.components[1].columns", "need header = true")
    expect(tmp_path, with_comps('[{ columns = "0:4", dtype = "float32", colums = 1 }]'),
           "nodes.reader.params.components[0].colums", 'did you mean "columns"?')
    fixed = BASE.replace('files = "data/*.csv"', 'files = "d.bin"\nformat = "fixed"\nheader = true')
    expect(tmp_path, fixed, "nodes.reader.params.header", 'used only with format = "csv"')


def test_a_reader_may_read_and_write_filename_queues(tmp_path):
    fq = '\n[queues.names]\nkind = "fifo"\ncapacity = 10\ndtypes = ["string"]\nshapes = [[]]\nexternal = true\n'
    ok = BASE.replace('writes = ["inst"]', 'writes = ["inst"]\nreads = ["names"]') + fq
    assert load(write(tmp_path, ok)).node("reader").reads == ("names",)
    bad = BASE.replace('writes = ["inst"]', 'writes = ["inst"]\nreads = ["inst"]')
    expect(tmp_path, bad, "nodes.reader.reads[0]", "a reader reads file names", 'queue "inst" must hold one scalar string')


def test_dtypes_and_shapes_hints_must_match_the_queues_a_node_reads(tmp_path):
    hint = BASE + '[nodes.sink.params]\ndtypes = ["float32", "int32"]\n'
    expect(tmp_path, hint, "nodes.sink.params.dtypes[1]", "component 1 is int32 here but int64 in queue \"inst\"")
    shp = BASE + '[nodes.sink.params]\nshapes = [[-1], [2]]\n'
    expect(tmp_path, shp, "nodes.sink.params.shapes[1]", "has shape [2] here but []")
    assert load(write(tmp_path, BASE + '[nodes.sink.params]\nshapes = [[-1], []]\n'))
    user = BASE.replace('writes = ["inst"]', 'writes = ["inst"]').replace('kind = "consumer"', 'kind = "p.m:f"')
    expect(tmp_path, user + '[nodes.sink.params]\ndtypes = ["float64", "int64"]\n', "nodes.sink.params.dtypes[0]",
           "is float64 here")


def test_a_feeder_must_copy_between_queues_holding_the_same_items(tmp_path):
    feed = BASE.replace('[nodes.sink]\nkind = "consumer"\nreads = ["inst"]',
                        '[nodes.feed]\nkind = "feeder"\nreads = ["inst"]\nwrites = ["copy"]\n'
                        '[nodes.sink]\nkind = "consumer"\nreads = ["copy"]\n'
                        '[queues.copy]\nkind = "fifo"\ncapacity = 5\ndtypes = ["float32", "int64"]\nshapes = [[4], [1]]')
    expect(tmp_path, feed, "nodes.feed", "has shape [] in queue \"inst\" but [1] in queue \"copy\"")


def test_port_clashes_and_ranges_are_reported(tmp_path):
    two = '[queue_hosts.a]\nport = 5555\n[queue_hosts.b]\nport = 5555\n'
    expect(tmp_path, two + BASE.replace("capacity = 100", 'capacity = 100\nhost = "a"'), "queue_hosts.b.port",
           'queue hosts "a" and "b" both use 127.0.0.1:5555')
    expect(tmp_path, "[queue_hosts.a]\nport = 70000\n" + BASE, "queue_hosts.a.port",
           "must be between 1 and 65535", "got 70000")
    expect(tmp_path, "[queue_hosts.a]\nport = -1\n" + BASE, "queue_hosts.a.port", "got -1")


def test_port_zero_or_missing_is_allowed_only_on_one_machine(tmp_path):
    assert load(write(tmp_path, "[queue_hosts.a]\nport = 0\n" + BASE)).queue_hosts["a"].port == 0
    assert load(write(tmp_path, "[queue_hosts.a]\n" + BASE)).queue_hosts["a"].port == 0
    remote = BASE.replace("[nodes.sink]", '[hosts.gpu1]\naddress = "10.1.2.3"\n\n[nodes.sink]\nhost = "gpu1"')
    expect(tmp_path, "[queue_hosts.a]\nport = 0\n" + remote, "queue_hosts.a.port",
           'is 0 (any free port), but node "sink" runs on host "gpu1" (10.1.2.3)', "5555")
    expect(tmp_path, "[queue_hosts.a]\n" + remote, "queue_hosts.a.port", "missing, but node")
    expect(tmp_path, remote, "queue_hosts", "need a queue host with a fixed port")


def test_host_addresses_are_bare_addresses(tmp_path):
    expect(tmp_path, '[hosts.h]\naddress = "tcp://10.0.0.1:5555"\n' + BASE, "hosts.h.address", "without a scheme")
    expect(tmp_path, '[hosts.h]\naddress = "10.0.0.1:5555"\n' + BASE, "hosts.h.address", "without a port")
    expect(tmp_path, '[hosts.h]\naddress = "bad host"\n' + BASE, "hosts.h.address", "not an IP address or a host name")
    ok = load(write(tmp_path, '[hosts.h]\naddress = "::1"\n[queue_hosts.q]\nhost = "h"\nport = 7\n' + BASE))
    assert ok.queue_hosts["q"].address == "tcp://[::1]:7"


def test_replicas_and_gpu_settings_are_checked(tmp_path):
    def node(extra):
        return BASE.replace('[nodes.sink]', "[nodes.sink]\n" + extra)
    expect(tmp_path, node("replicas = 0"), "nodes.sink.replicas", "must be at least 1, got 0")
    expect(tmp_path, node('replicas = 3\ndevice = "gpu"\ngpus = [0, 1]'), "nodes.sink.gpus",
           "lists 2 GPUs for 3 replicas")
    expect(tmp_path, node("gpus = [0]"), "nodes.sink.gpus", 'add device = "gpu"')
    expect(tmp_path, node('device = "gpu"\ngpu_memory_fraction = 0'), "nodes.sink.gpu_memory_fraction",
           "more than 0 and at most 1, got 0")
    expect(tmp_path, node('device = "gpu"\ngpu_memory_fraction = 1.5'), "nodes.sink.gpu_memory_fraction", "got 1.5")
    expect(tmp_path, node('device = "tpu"'), "nodes.sink.device", 'expected one of "cpu", "gpu"')
    ps = BASE + '\n[nodes.ps]\nkind = "ps"\ndevice = "gpu"\n'
    expect(tmp_path, ps, "nodes.ps.device", "PS nodes run on the CPU")


def test_timeouts_and_restart_policy_are_checked(tmp_path):
    def node(extra):
        return BASE.replace('[nodes.sink]', "[nodes.sink]\n" + extra)
    expect(tmp_path, node("timeout = 0"), "nodes.sink.timeout", "more than 0 seconds")
    expect(tmp_path, BASE.replace('name = "t"', 'name = "t"\ndefault_timeout = -inf'),
           "pipeline.default_timeout", "expected a number or inf, got -inf")
    expect(tmp_path, node("max_restarts = 2"), "nodes.sink.max_restarts", 'restart = "on-failure"')
    expect(tmp_path, node('restart = "always"'), "nodes.sink.restart", 'expected one of "never", "on-failure"')
    assert load(write(tmp_path, node('restart = "on-failure"'))).node("sink").max_restarts == 3


def test_queue_capacity_and_min_after_dequeue_rules(tmp_path):
    expect(tmp_path, BASE.replace("capacity = 100", "capacity = 0"), "queues.inst.capacity", "at least 1")
    expect(tmp_path, BASE.replace("min_after_dequeue = 10", "min_after_dequeue = 100"),
           "queues.inst.min_after_dequeue", "must be less than capacity (100), got 100")
    expect(tmp_path, BASE.replace("min_after_dequeue = 10", "min_after_dequeue = -1"),
           "queues.inst.min_after_dequeue", "at least 0")
    fifo = BASE.replace('kind = "shuffle"', 'kind = "fifo"')
    expect(tmp_path, fifo, "queues.inst.min_after_dequeue", "applies only to shuffle queues")
    expect(tmp_path, fifo.replace("min_after_dequeue = 10", "seed = 3"), "queues.inst.seed", "only to shuffle")
    expect(tmp_path, BASE.replace('kind = "shuffle"', 'kind = "lifo"'), "queues.inst.kind",
           'expected one of "fifo", "shuffle", "padding"')


def test_invalid_dtype_names_suggest_a_valid_one(tmp_path):
    expect(tmp_path, BASE.replace('"float32", "int64"]', '"float", "int64"]'), "queues.inst.dtypes[0]",
           'unknown dtype "float"; did you mean "float64"?')
    expect(tmp_path, BASE.replace('"float32", "int64"]', '"tf.float32", "int64"]'), "queues.inst.dtypes[0]",
           'did you mean "float32"?')
    expect(tmp_path, BASE.replace('"float32", "int64"]', '"f4", "int64"]'), "queues.inst.dtypes[0]",
           'did you mean "float32"?')
    expect(tmp_path, BASE.replace('dtypes = ["float32", "int64"]', 'dtypes = []'), "queues.inst.dtypes", "at least one dtype")


def test_shapes_must_be_lists_of_sizes_or_the_unknown_marker(tmp_path):
    expect(tmp_path, BASE.replace("shapes = [[4], []]", "shapes = [4, []]"), "queues.inst.shapes[0]",
           "got 4; write [4]")
    expect(tmp_path, BASE.replace("shapes = [[4], []]", 'shapes = [["?"], []]'), "queues.inst.shapes[0][0]",
           'write -1 for an unknown dimension, not "?"')
    expect(tmp_path, BASE.replace("shapes = [[4], []]", "shapes = [[-2], []]"), "queues.inst.shapes[0][0]",
           "expected a dimension >= 0")
    expect(tmp_path, BASE.replace("shapes = [[4], []]", "shapes = [[-1], []]"), "queues.inst.shapes[0][0]",
           'allowed only in padding queues; give the size, or set kind = "padding"')
    expect(tmp_path, BASE.replace("shapes = [[4], []]", "shapes = [[4]]"), "queues.inst.shapes",
           "gives 1 shape for 2 dtypes")
    pad = BASE.replace('kind = "shuffle"', 'kind = "padding"').replace("min_after_dequeue = 10\n", "")
    expect(tmp_path, pad.replace("shapes = [[4], []]\n", ""), "queues.inst.shapes", "a padding queue needs a shape")
    assert load(write(tmp_path, pad.replace("shapes = [[4], []]", "shapes = [[-1], []]"))).queue("inst").shapes == (
        (None,), ())


def test_component_names_must_match_dtypes(tmp_path):
    expect(tmp_path, BASE.replace("shapes = [[4], []]", 'shapes = [[4], []]\nnames = ["a"]'), "queues.inst.names",
           "gives 1 names for 2 dtypes")
    expect(tmp_path, BASE.replace("shapes = [[4], []]", 'shapes = [[4], []]\nnames = ["a", "a"]'),
           "queues.inst.names[1]", 'repeats the component name "a"')
    expect(tmp_path, BASE.replace("shapes = [[4], []]", 'shapes = [[4], []]\nnames = ["x", "z"]'),
           "nodes.reader.params.components", "component names (x, y) differ")


def test_names_must_be_identifier_like(tmp_path):
    expect(tmp_path, BASE.replace("[nodes.sink]", '[nodes."my sink"]'), 'nodes."my sink"',
           'node name "my sink" must start with a letter')
    expect(tmp_path, BASE.replace("[queues.inst]", '[queues.9inst]'), "queues.9inst", "queue name")
    expect(tmp_path, BASE.replace('name = "t"', 'name = "a b"'), "pipeline.name", "pipeline name")


def test_sizes_accept_binary_units_only(tmp_path):
    ok = load(write(tmp_path, '[queue_hosts.q]\nmax_message_size = "1.5 KiB"\n' + BASE))
    assert ok.queue_hosts["q"].max_message_size == 1536
    expect(tmp_path, '[queue_hosts.q]\nmax_message_size = "64MB"\n' + BASE, "queue_hosts.q.max_message_size",
           'write "64MiB"')
    expect(tmp_path, '[queue_hosts.q]\nmax_message_size = 0\n' + BASE, "queue_hosts.q.max_message_size",
           "at least 1 byte")


def test_every_problem_in_a_file_is_reported_in_file_order(tmp_path):
    text = (BASE.replace("capacity = 100", 'capacity = "100"')
                .replace('kind = "consumer"', 'kind = "consumr"')
                .replace('writes = ["inst"]', 'writes = ["inst"]\nreplica = 2'))
    err = error(tmp_path, text)
    assert [p.key for p in err.problems] == ["queues.inst.capacity", "nodes.reader.replica", "nodes.sink.kind"]
    assert [p.line for p in err.problems] == sorted(p.line for p in err.problems)
    assert str(err).startswith(f"{tmp_path / 'topo.toml'}: 3 problems:\n  {tmp_path / 'topo.toml'}:6: queues.inst.capacity:")
    assert isinstance(err, ValueError) and err.key == "queues.inst.capacity"


def test_a_file_without_nodes_is_reported(tmp_path):
    expect(tmp_path, '[pipeline]\nname = "t"\n[nodes]\n', "nodes", "declares no nodes")
    expect(tmp_path, '[pipeline]\nname = "t"\n[nodes]\nkind = "reader"\n', "nodes.kind",
           "declare each node as its own [nodes.NAME] table")
