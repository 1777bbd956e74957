"""Weight files checked from their headers, without loading the weights."""

import json

import pytest
import torch
from safetensors.torch import save_file

from shardtune.inputs.model_check import ModelError, check_weights


@pytest.fixture
def shards(tmp_path):
    save_file({"a": torch.zeros(64, 64)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.ones(32)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    return tmp_path


def test_complete_shards_pass(shards):
    check_weights(shards)


def test_a_shard_the_index_names_is_missing(shards):
    (shards / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelError, match=r"model.safetensors.index.json lists model-00002-of-00002.safetensors, which is missing \(1 of 2 shards\)"):
        check_weights(shards)


def test_a_cut_off_shard_is_named_with_its_sizes(shards):
    path = shards / "model-00001-of-00002.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(ModelError, match=rf"{path.name}: truncated: {len(data) - 100} bytes, its tensors need {len(data)}"):
        check_weights(shards)


def test_a_file_that_is_not_safetensors(shards):
    (shards / "model-00002-of-00002.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}")
    with pytest.raises(ModelError, match="header is not valid JSON"):
        check_weights(shards)
    (shards / "model-00002-of-00002.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ModelError, match="its header claims"):
        check_weights(shards)
