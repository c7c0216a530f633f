"""Fuzzing model files: however a valid file is damaged (bytes, zip members, manifest
fields, array headers, JSON values), opening it ends in a clean load or a one-line refusal
naming the file: never a crash, a hang or memory out of proportion.

Hypothesis (derandomized, so every run tries the same cases) writes several hundred damaged
copies of a small pipeline file and a small detector file; child processes, under a memory
limit, open them in batches and report each case, so that a case which kills its child is
still named (the child is restarted after it).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import resource
import subprocess
import sys
import time
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_artifact import X, _pipeline

from kad.registry import get_detector

CASES = 320
BATCH = 80
WORKERS = 2
CASE_SECONDS = 5.0  # of CPU per case
MEMORY_BYTES = 3 * 2**30  # address space of a child: its libraries take most of it
CASE_RSS_MIB = 300  # growth of the resident set a case may cause

CHILD = r"""
import json, resource, sys, time
import numpy as np
from kad.detectors.base import load_detector
from kad.errors import ArtifactError
from kad.screening.pipeline import load_pipeline

cases = json.loads(open(sys.argv[1]).read())
X = np.load(sys.argv[2])
start, stop = int(sys.argv[3]), int(sys.argv[4])
for i in range(start, stop):
    path = cases[i]
    print("START", i, flush=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.process_time()  # CPU time: other processes on the machine do not count
    try:
        if path.endswith(".pipeline.kad"):
            detector = load_pipeline(path).detector
        else:
            detector = load_detector(path)
        detector.anomaly_score(X)
        outcome = "OK"
    except ArtifactError as exc:
        outcome = "REFUSED " + json.dumps(str(exc))
    except BaseException as exc:
        outcome = "BAD " + json.dumps(f"{type(exc).__name__}: {exc}"[:500])
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print("END", i, f"{time.process_time() - t:.3f}", grown, outcome, flush=True)
"""


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))


def _read(path: Path) -> tuple[dict, dict]:
    with zipfile.ZipFile(path) as zf:
        return ({n: zf.read(n) for n in zf.namelist()},
                {n: zf.getinfo(n).compress_type for n in zf.namelist()})


def _write(path: Path, members: list[tuple[str, bytes]], rehash: bool = True,
           deflate: frozenset = frozenset()) -> None:
    """Members in order (duplicates kept); the manifest's checksums recomputed unless
    ``rehash`` is false, as an attacker would."""
    if rehash:
        names = dict(members)
        try:
            manifest = json.loads(names["manifest.json"])
            if isinstance(manifest, dict):
                manifest["members"] = {n: hashlib.sha256(d).hexdigest() for n, d in members
                                       if n != "manifest.json"}
                members = [(n, json.dumps(manifest).encode() if n == "manifest.json" else d)
                           for n, d in members]
        except (KeyError, ValueError):
            pass
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w") as zf:
        warnings.simplefilter("ignore")  # duplicated names are a case
        for name, data in members:
            zf.writestr(name, data, zipfile.ZIP_DEFLATED if name in deflate
                        else zipfile.ZIP_STORED)


#: Stands for an integer of 5,000 digits, which JSON allows and Python refuses to parse.
HUGE = "<huge>"


def _dumps(value) -> bytes:
    return json.dumps(value).replace(json.dumps(HUGE), "9" * 5000).encode()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70)
    | st.sampled_from([0, -1, -5, 10**9, 2**63, HUGE])
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=8)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node[:3]):
            yield from _paths(v, (*prefix, i))


def _replace_at(node, path, value):
    if not path:
        return value
    node[path[0]] = _replace_at(node[path[0]], path[1:], value)
    return node


def _npy(shape, dtype, data_len) -> bytes:
    buffer = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(shape)}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + bytes(data_len)


MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)),
                                        min_size=1, max_size=8)),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("drop"), st.integers(0, 50)),
    st.tuples(st.just("duplicate"), st.integers(0, 50)),
    st.tuples(st.just("rename"), st.integers(0, 50), st.sampled_from(
        ["object.json", "manifest.json", "arrays/x.npy", "../evil", "sklearn/a.skops", "dir/"])),
    st.tuples(st.just("inflate"), st.integers(0, 50), st.sampled_from([2**20, 2**24, 2**27])),
    st.tuples(st.just("manifest"), st.sampled_from(
        ["format", "kind", "versions", "members", "info", "created"]), JSON),
    st.tuples(st.just("npy"), st.integers(0, 50),
              st.lists(st.integers(-3, 2**40), max_size=3),
              st.sampled_from(["<f8", "<f4", "<i8", "|b1", "<U4", "|S3", "<c16", "<M8[s]"]),
              st.integers(0, 4096)),
    st.tuples(st.just("json"), st.integers(0, 10**6), JSON),
    st.tuples(st.just("json"), st.integers(0, 10**6), st.sampled_from(
        [float("nan"), -5, 0, 10**30, "", [], {}, {"$array": "manifest.json"},
         {"$sklearn": "object.json"}, {"$keras": "arrays/x"}, {"$tuple": 3}])),
)


def _mutate(src: Path, dst: Path, mutation) -> None:
    kind = mutation[0]
    if kind in ("flip", "truncate"):
        data = bytearray(src.read_bytes())
        if kind == "flip":
            for where, xor in mutation[1]:
                data[min(int(where * len(data)), len(data) - 1)] ^= xor
        else:
            data = data[:int(mutation[1] * len(data))]
        dst.write_bytes(bytes(data))
        return
    members, _ = _read(src)
    names = list(members)
    items = list(members.items())
    if kind in ("drop", "duplicate", "rename", "inflate", "npy"):
        pool = [n for n in names if n.endswith(".npy")] if kind == "npy" else names
        name = pool[mutation[1] % len(pool)]
        if kind == "drop":
            _write(dst, [(n, d) for n, d in items if n != name])
        elif kind == "duplicate":
            _write(dst, [*items, (name, members[name])], rehash=False)
        elif kind == "rename":
            _write(dst, [(mutation[2] if n == name else n, d) for n, d in items])
        elif kind == "inflate":
            _write(dst, [(n, bytes(mutation[2]) if n == name else d) for n, d in items],
                   deflate=frozenset({name}))
        else:
            _, _, shape, dtype, length = mutation
            _write(dst, [(n, _npy(shape, dtype, length) if n == name else d)
                         for n, d in items])
        return
    if kind == "manifest":
        manifest = json.loads(members["manifest.json"])
        manifest[mutation[1]] = mutation[2]
        _write(dst, [(n, _dumps(manifest) if n == "manifest.json" else d)
                     for n, d in items], rehash=mutation[1] != "members")
        return
    tree = json.loads(members["object.json"])
    paths = list(_paths(tree))
    tree = _replace_at(tree, paths[mutation[1] % len(paths)], mutation[2])
    _write(dst, [(n, _dumps(tree) if n == "object.json" else d)
                 for n, d in items])


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("fuzz")
    return [_pipeline().save(folder / "p.pipeline.kad"),
            get_detector("knn").fit(X).save(folder / "k.detector.kad")]


def _run(cases: list[str], folder: Path) -> dict[int, tuple]:
    """Each case's (outcome, seconds, grown KiB), children restarted after a crash."""
    listing = folder / "cases.json"
    listing.write_text(json.dumps(cases))
    np.save(folder / "x.npy", X)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    results: dict[int, tuple] = {}

    def batch(start: int, stop: int) -> None:
        while start < stop:
            proc = subprocess.Popen(
                [sys.executable, "-c", CHILD, str(listing), str(folder / "x.npy"), str(start),
                 str(stop)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                env=env, preexec_fn=_limit_memory)
            try:
                out, err = proc.communicate(timeout=30 + CASE_SECONDS * (stop - start))
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            last = start
            for line in out.splitlines():
                parts = line.split(" ", 4)
                if parts[0] == "START":
                    last = int(parts[1])
                elif parts[0] == "END":
                    results[int(parts[1])] = (parts[4], float(parts[2]), int(parts[3]))
            if last not in results:  # the case that killed or hung its child
                results[last] = (f"DIED rc={proc.returncode} {err[-300:]!r}", 0.0, 0)
                start = last + 1
            else:
                start = stop

    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(lambda s: batch(s, min(s + BATCH, len(cases))),
                      range(0, len(cases), BATCH)))
    return results


def test_damaged_model_files_never_crash_or_exhaust_the_loader(originals, tmp_path):
    cases: list[str] = []
    mutations: list = []

    @settings(max_examples=CASES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from([0, 1]), MUTATION)
    def generate(which, mutation):
        src = originals[which]
        dst = tmp_path / f"case{len(cases):04d}.{src.name.split('.', 1)[1]}"
        _mutate(src, dst, mutation)
        cases.append(str(dst))
        mutations.append(mutation)

    generate()
    assert len(cases) >= 300
    began = time.monotonic()
    results = _run(cases, tmp_path)
    elapsed = time.monotonic() - began
    problems = []
    for i, path in enumerate(cases):
        outcome, seconds, grown = results.get(i, ("MISSING", 0.0, 0))
        what = f"case {i} {str(mutations[i])[:120]}: "
        if outcome.startswith("REFUSED"):
            message = json.loads(outcome[8:])
            if "\n" in message or path not in message:
                problems.append(what + f"refusal not one line naming the file: {message!r}")
        elif outcome != "OK":
            problems.append(what + outcome)
        if seconds > CASE_SECONDS:
            problems.append(what + f"took {seconds:.1f} s")
        if grown > CASE_RSS_MIB * 1024:
            problems.append(what + f"grew the process by {grown // 1024} MiB")
    refused = sum(r[0].startswith("REFUSED") for r in results.values())
    print(f"{len(cases)} cases in {elapsed:.1f} s: {refused} refused, "
          f"{len(cases) - refused} loaded")
    assert not problems, "\n".join(problems[:30])
