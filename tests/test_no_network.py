"""kad sends nothing anywhere: its own code imports no networking module and fetches
nothing, except where a user asks it to reach something by name. What OpenVINO's converter
sends, and how to stop it, is in the README (*What kad sends over the network*)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = ("kad", "kad_plugins", "kad_recipes")
NETWORK = {"urllib", "http", "socket", "ssl", "requests", "httpx", "aiohttp", "urllib3",
           "ftplib", "smtplib", "xmlrpc", "websocket", "websockets", "grpc", "telnetlib"}
#: Each exception, and why it is one.
ALLOWED_IMPORTS = {
    # a TCP probe of the Ray address the user gave (--ray-address), so that an unreachable
    # cluster fails in seconds; nothing is sent
    ("kad/features/ray_engine.py", "socket"),
    # socket.gethostname(): the host written into an output's lock file; nothing is sent
    ("kad/utils/files.py", "socket"),
}
#: Downloads through Keras, of files the user asked for by name (ImageNet weights with
#: --weights imagenet, which keras.applications fetches, and SqueezeNet's, which its
#: backbone fetches from the public release with keras.utils.get_file and its md5; the
#: Keras and SVHN datasets).
ALLOWED_FETCHES = {"kad/data/datasets/natural.py", "kad_plugins/backbones.py"}


def _modules():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text(), str(path))


def test_kad_imports_no_networking_module():
    found = set()
    for name, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots = [node.module.split(".")[0]]
            else:
                continue
            found |= {(name, root) for root in roots if root in NETWORK}
    assert found == ALLOWED_IMPORTS


def test_kad_fetches_only_what_a_user_names():
    fetching = set()
    for name, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("get_file", "urlopen",
                                                                  "urlretrieve"):
                fetching.add(name)
    assert fetching == ALLOWED_FETCHES
