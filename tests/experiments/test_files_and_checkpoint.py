import random

import numpy as np
import pytest
import torch

from samkit.experiments.checkpoint import load_checkpoint, restore_rng_state, save_checkpoint
from samkit.experiments.files import read_json, write_bytes_with, write_json


def test_rng_round_trip(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    save_checkpoint(path, {"epoch": 4})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    payload = load_checkpoint(tmp_path)
    restore_rng_state(payload["rng"])
    assert payload["epoch"] == 4
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_a_failed_write_leaves_the_previous_file_whole(tmp_path):
    path = tmp_path / "summary.json"
    write_json(path, {"a": 1})

    def broken(handle):
        handle.write(b"{partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_bytes_with(path, broken)
    assert read_json(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_foreign_files_are_refused_with_the_path(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not a readable samkit checkpoint"):
        load_checkpoint(tmp_path / "checkpoint.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")
