"""The cell ids of the built-in grid presets, pinned: a refactoring that changes an id orphans every
stored result of that cell, so an id may change only on purpose (then regenerate the lists below).

The data set is a stub (a fixed fingerprint, 10 classes, flipped like CIFAR-10) and the versions are
pinned to those the lists were made with (tsbd 0.1, torch 2.13), so the test does not depend on the
installed torch or on the real CIFAR-10 archive; the trigger files under the shared data folder are
hashed into the ids, so they must be there.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from conftest import SHARED_DATA

from tsbd.bench import grid

PAPER_CIFAR10_CPU = [
    "2f7e8a6fc2dcb9c0", "46a54f1aca140716", "90bafab8273b3660", "1a53123c75a01337", "022fa1d5c5f7bf10",
    "b9c89a36391a5302", "079ddb18d46bbe93", "57c13599e3383b0b", "6899eaa7e0eb44d7", "06121cca144615fc",
    "a43685bfd9049299", "4c6e553510948b75", "5154d050d706f0ed", "de19678be5ea30c9", "d650c5ecf9ab8091",
    "16051997f2403c5f", "dc95bcf1cd4d64d0", "9b3ed2c3d1c29cb2", "22d766ca05790b41", "04e2d797bd2b776d",
    "148cf973d1f1baa0", "daa371a907199229", "b9e0afdd0882d544", "e83904d1c11b961e", "a8b8e5b182ab91e1",
    "1e1cf84980c8d7b1", "350881de8aedcc64", "1eda49cff8f05752", "4c3a8cac0cc4058d", "fd59c8a0abb37813",
    "961bd0efac9b877b", "0130841f7c73cdda", "7150569e8ae705be", "ee57d1f3e6b9c43e", "8b7375643887576c",
    "f901457ff6ad5409", "28662017521a908b", "5fb202bcb4a4ac91", "d448551e583f9df7", "34486f5c0a541e7c",
    "75f264e768f8a36d", "c65d19ff2722ee43", "0ff5e3f8d97aa853", "47b52aa120c589e3", "d3b26b68ba763e10",
    "3ad5f0a72403e6be", "ab8fe9f31661da24", "c281e0b391f6c5c9", "b22678b9c74c2f96", "40a17775f61d1bd7",
    "4946f5c88ae3320d", "ef2f24788cea35c7", "1eab0e71a5b11759", "4413ef11b651fef0", "a41e45dba71cdfcc",
    "0b574543a8b0fe6b", "fb08b847c7652ab4", "3ec58043d5a0607c", "82eb7e32966a23e8", "d2f831c44b9b0431",
    "17fd0b60fab2a612", "31a178a471f0cb35", "d0724cb597225147", "43a4676c8f3db5e1", "c9ee2eb39ca9ee80",
    "a5654558d5fdd116", "8f4d1ea456614f93", "87104f740420a735", "74435f8c5d6c988c", "0ae15f8b87330d48",
    "b391415b5ca15dfa", "45d40ce828c215f6", "8da2eeb62bae192e", "8aae18995935d424", "0af403dd6384a0bb",
    "3adcbe089d8e0bd1", "24b7b2b04ed118d4", "0b00f52dbc0f677c", "90b1a1d125939083", "aa2b20fdf8f91951",
]

PAPER_CIFAR10_R18_CPU = [
    "2b8a169693f9f1fa", "29c4f802973eedd5", "f3dee447ca1ae5e6", "89d0203749bad256", "735cd2e923272327",
    "f7b1fda670da5a31", "8b282fc7675cd9cd", "965051f4af972822", "802ca979eda85df4", "6ef0e582abe08720",
    "9f39daabfa20e30e", "3f039685a06957d9", "fcdc6ec150d9d75e", "d6ef0960313b6b1e", "4763080b1a0925f2",
    "d9b67421d694f636", "6ac10aa13713da89", "21c31d3122659465", "723bd5b568b7d965", "bcd4e8290216d50c",
    "03d6b6c53241e20d", "02b8418da3375c63", "f6e21fcd27af9243", "c07053c34913f0e8", "1be8771ecd30c740",
    "eb2a9cb41677ab5c", "0c9311f08face37d", "baff37feea8dccee", "468165bc2445e2a2", "89563d4ae1f54646",
    "57e6067aad75c2a6", "012f88b26b5e970f", "f690acc49ac62b28", "7bb22ce692ae9e9c", "475be403bf569fbc",
    "8afab4fdf8fae330", "74df9c6cd8eceab2", "627f3d26dfd216ee", "073c7b2848a24bb6", "79d942c689d321fb",
    "214242f8603c205e", "b16131106cd91988", "cbe6f4e177ff0e53", "1d7ed329f034ed3a", "5a520dd3983cb414",
    "99ff0be42b9668c6", "67b051321d18769c", "23f93d0d2e7ea60f", "87a701f286b9539c", "66f6e70f77951c89",
    "e71e72ed6cc0c6b7", "bf7c7b67f3b3ca08", "3f6addb76da18161", "9c28167407c69144", "05222e04e6c59f79",
    "5362c8d7350886b9", "918ccdfc378e49be", "57f02e3ac26c7958", "4ebf0229cf22c636", "d7c5f4e4c34b360e",
    "871c6a8e82acfacd", "6830564561b8ec64", "7e847abfdbe20ab5", "1a6ceaaa3a8f336b", "a9b8cd32ed75da72",
    "01b3a670979d87a7", "f823646abf8dc1e2", "9182a6b414dbd831", "c698a4a169b3e52a", "72e0d6bb53307c5a",
    "e3709d00d8428aa5", "786f951ed2659198", "bdb25b358ea0f7de", "0d3495b7b488d96f", "57ca6c4442296591",
    "6f5900e534ddf703", "c6443547202db0a3", "ecf76d98079838c3", "27dd852e064c6976", "b5c77273e4fb7044",
]


def _stub_loader(ds_spec, **_):
    return SimpleNamespace(fingerprint="stub-fingerprint", num_classes=10, train=SimpleNamespace(hflip=True))


@pytest.mark.skipif(not (SHARED_DATA / "backdoorbench-triggers").is_dir(),
                    reason=f"the BackdoorBench trigger files are not under {SHARED_DATA} (set TSBD_TEST_SHARED_DATA)")
@pytest.mark.parametrize("preset, expected", [("paper-cifar10-cpu", PAPER_CIFAR10_CPU),
                                              ("paper-cifar10-r18-cpu", PAPER_CIFAR10_R18_CPU)])
def test_preset_cell_ids_unchanged(preset, expected, monkeypatch):
    monkeypatch.setattr(grid, "relevant_versions", lambda: {"tsbd": "0.1", "torch": "2.13"})
    plan = grid.expand(grid.load_spec(preset), data_root=str(SHARED_DATA), dataset_loader=_stub_loader)
    assert [c.id for c in plan.cells] == expected
