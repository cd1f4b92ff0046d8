"""Non-tensor values people keep in checkpoints are stored as typed JSON (never pickle)
and come back as the same types; a checkpoint cannot make a load import a module or run
a class's code; fsck accepts every tag."""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import enum
import json
import logging
import pathlib
import sys

import pytest
import torch

import ckptstore
from ckptstore import manifest as fmt
from ckptstore.errors import CorruptCheckpointError
from ckptstore.plan.tree import flatten, unflatten


class Color(enum.Enum):
    RED = "r"
    BLUE = "b"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclasses.dataclass(frozen=True)
class Opt:
    lr: float
    out: pathlib.Path
    color: Color = Color.RED
    tags: frozenset = frozenset()


INITS = []


@dataclasses.dataclass
class Watched:
    a: int

    def __post_init__(self):
        INITS.append(self.a)


def _values():
    return {
        "path": pathlib.Path("runs") / "exp1",
        "pure": pathlib.PurePosixPath("/a/b"),
        "color": Color.BLUE,
        "level": Level.HIGH,
        "opt": Opt(0.1, pathlib.Path("/tmp/o"), tags=frozenset({"x", "y"})),
        "ns": argparse.Namespace(epochs=3, name="run", sub=argparse.Namespace(k=[1, 2])),
        "set": {3, 1, 2},
        "when": dt.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=dt.timezone(dt.timedelta(hours=2))),
        "naive": dt.datetime(2026, 1, 2, 3, 4, 5),
        "day": dt.date(2026, 12, 6),
        "time": dt.time(7, 8, 9),
        "span": dt.timedelta(days=1, seconds=2, microseconds=3),
        "z": complex(1.5, -2.0),
        "dev": torch.device("cpu"),
        "dtype": torch.bfloat16,
        Color.RED: "enum key",
        pathlib.Path("k"): "path key",
        "w": torch.arange(4.0),
    }


def test_every_type_round_trips_through_a_checkpoint(tmp_path):
    state = _values()
    ckptstore.save(state, tmp_path / "c", blocking=True)
    out = ckptstore.load(tmp_path / "c")
    assert torch.equal(out.pop("w"), state.pop("w"))
    assert out == state
    for k, v in state.items():
        assert type(out[k]) is type(v), k
    assert type(out["opt"].out) is type(pathlib.Path("/tmp/o"))
    assert out["when"].utcoffset() == dt.timedelta(hours=2)
    assert ckptstore.fsck(tmp_path / "c").ok
    # stored as tagged JSON in the manifest, no pickle
    raw = (tmp_path / "c" / fmt.MANIFEST_NAME).read_text()
    assert '"T":"enum"' in raw.replace(" ", "") and "pickle" not in raw


def test_a_dataclass_is_rebuilt_without_running_its_code():
    skeleton, _ = flatten({"w": Watched(5)})
    INITS.clear()
    out = unflatten(json.loads(json.dumps(skeleton)), lambda kind, i: None)
    assert type(out["w"]) is Watched and out["w"].a == 5
    assert INITS == []  # __init__/__post_init__ never ran


def test_types_whose_module_is_not_imported_come_back_plain(caplog):
    skeleton, _ = flatten({"c": Color.BLUE, "o": Opt(0.5, pathlib.Path("x"))})
    text = json.dumps(skeleton).replace(__name__ + ":", "not_imported_module_xyz:")
    with caplog.at_level(logging.WARNING):
        out = unflatten(json.loads(text), lambda kind, i: None)
    assert out["c"] == "b"  # the enum's value
    assert out["o"]["lr"] == 0.5 and out["o"]["out"] == pathlib.Path("x")
    assert "not_imported_module_xyz" not in sys.modules  # never imported
    assert "import its module" in caplog.text


@pytest.mark.parametrize("node", [
    {"T": "enum", "cls": "os:system", "name": "x", "v": "ls"},  # not an Enum: plain value
    {"T": "dataclass", "cls": "subprocess:Popen", "fields": [["args", "ls"]]},  # not a dataclass
    {"T": "dataclass", "cls": "builtins:object.__subclasses__", "fields": []},
])
def test_a_checkpoint_cannot_name_a_callable(node):
    out = unflatten(node, lambda kind, i: None)
    assert isinstance(out, (str, dict))


@pytest.mark.parametrize("node", [
    {"T": "path", "cls": "PosixPath", "v": 5},
    {"T": "path", "cls": "EvilPath", "v": "/x"},
    {"T": "timedelta", "v": [1, "2", 3]},
    {"T": "datetime", "v": "not a date"},
    {"T": "set", "items": [{"T": "list", "items": []}]},  # an unhashable member
    {"T": "dict", "items": [[{"T": "set", "items": []}, 1]]},  # an unhashable key
    {"T": "complex", "re": "1", "im": None},
    {"T": "enum", "cls": 7, "name": "A", "v": 1},
])
def test_malformed_typed_nodes_are_corrupt(node):
    with pytest.raises(CorruptCheckpointError):
        unflatten(node, lambda kind, i: None)


@pytest.mark.parametrize("node", [
    {"T": "path", "cls": "EvilPath", "v": "/x"},
    {"T": "datetime", "v": "yesterday"},
    {"T": "dataclass", "cls": "m:C", "fields": [[1, 2]]},
    {"T": "pickle", "v": "gASVAAAAAAAAAAB9lC4="},
])
def test_fsck_names_a_malformed_or_unknown_value_node(tmp_path, node):
    from fuzz.parsers import seal

    ckptstore.save({"w": torch.ones(2), "v": pathlib.Path("a")}, tmp_path / "c", blocking=True)
    path = tmp_path / "c" / fmt.MANIFEST_NAME
    obj = json.loads(path.read_text())
    items = obj["tree"]["items"]
    assert items[1][0] == "v"
    items[1][1] = node
    path.write_bytes(seal(obj))
    report = ckptstore.fsck(tmp_path / "c")
    assert not report.ok and any("state tree" in d.problem for d in report.damage)
    with pytest.raises(CorruptCheckpointError):
        ckptstore.load(tmp_path / "c")
