"""Strict config loading: unknown keys and wrong types name the key; cross-field rules hold."""
from __future__ import annotations

import pytest
import yaml

from common.config import PipelineConfig, config_hash, from_dict, load_config


def test_shipped_configs_load(repo_root):
    tiny = load_config(repo_root / "configs/tiny.yaml")
    big = load_config(repo_root / "configs/mugv_10b.yaml")
    assert [s.world_size for s in tiny.train.stages] == [2, 2, 2]
    assert tiny.train.stages[0].data_parallel == 2 and tiny.train.stages[2].tensor_parallel == 2
    assert big.train.dit.hidden_size == 3456 and big.train.stages[0].nproc_per_node == 8
    assert config_hash(tiny) != config_hash(big)


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"train": {"stages": [{"name": "a", "stepz": 3}]}}))
    with pytest.raises(ValueError, match=r"train\.stages\[0\]\.stepz: unknown config key"):
        load_config(p)


def test_wrong_type_is_named():
    with pytest.raises(ValueError, match=r"curate\.clip_frames: expected int, got str"):
        from_dict(PipelineConfig, {"curate": {"clip_frames": "17"}})


@pytest.mark.parametrize("data, message", [
    ({"curate": {"clip_frames": 16}}, "8k\\+1"),
    ({"train": {"dit": {"in_channels": 16}}}, "must equal compress.vae.latent_channels"),
    ({"train": {"stages": [{"name": "a", "tensor_parallel": 4}]}}, "tensor_parallel \\(4\\) must divide"),
    ({"train": {"dit": {"hidden_size": 64, "num_heads": 2}}}, "multiple of 6"),
    ({"train": {"stages": []}}, "at least one stage"),
])
def test_cross_field_rules(data, message):
    with pytest.raises(ValueError, match=message):
        from_dict(PipelineConfig, data)


def test_hash_is_stable_and_sensitive():
    a, b = PipelineConfig(), PipelineConfig()
    assert config_hash(a) == config_hash(b)
    b.train.stages[0].lr = 1.0
    assert config_hash(a) != config_hash(b)


@pytest.mark.parametrize("text, message", [
    ("", r"c\.yaml: the file is empty"),
    ("# only a comment\n", r"c\.yaml: the file is empty"),
    ("name: x\ntrain:\n  stages: [\n", r"c\.yaml:4:1: YAML syntax error"),
    ("name: x\n  bad: indent\n", r"c\.yaml:2:6: YAML syntax error: mapping values are not allowed here"),
    ("- a\n- b\n", r"c\.yaml: the top level must be a mapping"),
    ("curate:\n  clip_frames: '17'\n", r"c\.yaml: curate\.clip_frames: expected int, got str"),
])
def test_config_errors_are_one_clear_message(tmp_path, text, message):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_config(p)
    with pytest.raises(FileNotFoundError, match=r"config file not found: .*nope\.yaml"):
        load_config(tmp_path / "nope.yaml")
