"""A model file cannot exhaust the process that opens it: what it may declare is checked
from the zip's central directory before anything is inflated (kad.utils.artifact)."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from kad.detectors.base import load_detector
from kad.errors import ArtifactError
from kad.registry import get_detector
from kad.utils import artifact

X = np.random.default_rng(0).normal(size=(40, 5)).astype(np.float32)


def _members(path: Path) -> tuple[dict, dict]:
    with zipfile.ZipFile(path) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        return manifest, {n: zf.read(n) for n in zf.namelist() if n != "manifest.json"}


def _write(dst: Path, manifest: dict, members: dict, deflate: set = frozenset()) -> Path:
    """A model file with the manifest's checksums recomputed, as an attacker would."""
    manifest = {**manifest, "members": {n: hashlib.sha256(d).hexdigest()
                                        for n, d in members.items()}}
    with zipfile.ZipFile(dst, "w") as zf:
        zf.writestr("manifest.json", json.dumps(manifest))
        for name, data in members.items():
            zf.writestr(name, data, zipfile.ZIP_DEFLATED if name in deflate
                        else zipfile.ZIP_STORED)
    return dst


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    return get_detector("mahalanobis").fit(X).save(
        tmp_path_factory.mktemp("limits") / "d.kad")


def _bomb(saved: Path, dst: Path, size: int = 256 * 2**20) -> Path:
    """A listed, checksummed member of ``size`` zero bytes, deflated to about a thousandth."""
    manifest, members = _members(saved)
    members["arrays/bomb.npy"] = bytes(size)
    return _write(dst, manifest, members, deflate={"arrays/bomb.npy"})


def test_a_member_that_inflates_a_thousandfold_is_refused_unread(saved, tmp_path):
    bomb = _bomb(saved, tmp_path / "bomb.kad")
    assert bomb.stat().st_size < 2**20
    with pytest.raises(ArtifactError) as caught:
        load_detector(bomb)
    message = str(caught.value)
    assert "\n" not in message and str(bomb) in message
    assert "arrays/bomb.npy" in message and "50 times allowed" in message


def test_opening_the_bomb_takes_no_memory(saved, tmp_path):
    bomb = _bomb(saved, tmp_path / "bomb.kad")
    script = ("import resource, sys; from kad.detectors.base import load_detector; "
              "from kad.errors import ArtifactError\n"
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "try:\n    load_detector(sys.argv[1])\nexcept ArtifactError:\n    pass\n"
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)")
    done = subprocess.run([sys.executable, "-c", script, str(bomb)], capture_output=True,
                          text=True, check=True, timeout=120)
    grown_kib = int(done.stdout.split()[-1])
    assert grown_kib < 64 * 1024, f"opening the file took {grown_kib / 1024:.0f} MiB more"


def test_a_huge_manifest_is_refused_before_it_is_read(saved, tmp_path):
    manifest, members = _members(saved)
    manifest["info"] = {"padding": "x" * (artifact.MAX_MANIFEST_BYTES + 1)}
    crafted = _write(tmp_path / "m.kad", manifest, members)
    with pytest.raises(ArtifactError, match=r"the member manifest.json declares 4\.0 MiB, more "
                                            r"than the 4\.0 MiB allowed"):
        load_detector(crafted)


def test_too_many_members_are_refused_from_the_directory(saved, tmp_path):
    manifest, members = _members(saved)
    for i in range(artifact.MAX_MEMBERS + 1):
        members[f"arrays/x{i}.npy"] = b""
    crafted = _write(tmp_path / "many.kad", manifest, members)
    with pytest.raises(ArtifactError, match=f"lists {len(members) + 1} members, more "
                                            f"than the {artifact.MAX_MEMBERS}"):
        load_detector(crafted)


def test_a_duplicated_member_is_refused(saved, tmp_path):
    manifest, members = _members(saved)
    crafted = _write(tmp_path / "dup.kad", manifest, members)
    name = next(n for n in members if n.endswith(".npy"))
    with pytest.warns(UserWarning), zipfile.ZipFile(crafted, "a") as zf:
        zf.writestr(name, members[name])
    with pytest.raises(ArtifactError, match=f"holds the member {name} twice"):
        load_detector(crafted)


def _lie_about_size(path: Path, name: str, declared: int) -> None:
    """Patch the central directory's uncompressed size of ``name`` (its CRC stays true)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(name)
    at = data.rfind(b"PK\x01\x02" + data[info.header_offset + 4:info.header_offset + 6],
                    0, len(data))
    while True:  # the central record of this member
        (length,) = struct.unpack("<H", data[at + 28:at + 30])
        if data[at + 46:at + 46 + length].decode() == name:
            break
        at = data.rfind(b"PK\x01\x02", 0, at)
    data[at + 24:at + 28] = struct.pack("<I", declared)
    path.write_bytes(bytes(data))


def test_a_member_declaring_more_than_it_holds_is_refused(saved, tmp_path):
    manifest, members = _members(saved)
    crafted = _write(tmp_path / "lie.kad", manifest, members)
    name = "arrays/detector.state.anomaly_scores_.npy"
    _lie_about_size(crafted, name, len(members[name]) + 1000)
    with pytest.raises(ArtifactError, match=f"the member {name} holds {len(members[name])} "
                                            f"bytes, not the {len(members[name]) + 1000}"):
        load_detector(crafted)


def test_an_npy_header_declaring_more_data_than_follows_is_refused(saved, tmp_path):
    manifest, members = _members(saved)
    name = "arrays/detector.state.anomaly_scores_.npy"
    header = np.lib.format.header_data_from_array_1_0(np.zeros(40))
    header["shape"] = (2**40,)
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    members[name] = buffer.getvalue() + np.zeros(40).tobytes()
    crafted = _write(tmp_path / "npy.kad", manifest, members)
    with pytest.raises(ArtifactError, match=rf"{name} is damaged: its header declares "
                                            r"\(1099511627776,\) of float64"):
        load_detector(crafted)


def test_the_limit_can_be_raised_and_is_checked(saved, monkeypatch):
    monkeypatch.setenv(artifact.LIMIT_ENV, "32e9")
    assert artifact.Limits.from_env().member_bytes == 32 * 10**9
    assert load_detector(saved).threshold_ > 0
    monkeypatch.setenv(artifact.LIMIT_ENV, "lots")
    with pytest.raises(ArtifactError, match="KAD_MODEL_MAX_BYTES='lots' is not a size"):
        load_detector(saved)


def test_explicit_limits_refuse_a_large_member(saved):
    with pytest.raises(ArtifactError, match=r"declares .* more than the 64 bytes allowed"):
        artifact.open_artifact(saved, "detector", artifact.Limits(member_bytes=64))
    assert zlib  # deflate is what the bomb uses
