from pathlib import Path

import pytest

from knowlm_nb import ROOT, config
from knowlm_nb.config import ConfigError


def test_every_profile_resolves_for_every_notebook():
    assert {"tiny", "gpu", "knowlm-13b"} <= set(config.profile_names())
    for profile in config.profile_names():
        for nb in config.notebook_ids():
            params = config.notebook_params(profile, nb)
            assert set(params) == set(config.valid_keys(nb))


def test_knowlm_13b_carries_the_published_settings():
    p = lambda nb: config.notebook_params("knowlm-13b", nb)  # noqa: E731
    assert p("01")["max_len"] == 1024
    pre = p("02")
    assert pre["deepspeed_config"].endswith("zero3.json")
    assert (pre["micro_batch"], pre["grad_accum"], pre["num_nodes"] * pre["num_gpus"]) == (20, 3, 24)
    assert pre["micro_batch"] * pre["grad_accum"] * pre["num_nodes"] * pre["num_gpus"] == 1440
    lora = p("03")
    assert (lora["lora_r"], lora["lora_alpha"], lora["lora_dropout"]) == (16, 32, 0.05)
    assert lora["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj",
                                      "gate_proj", "up_proj", "down_proj"]
    assert (lora["cutoff_len"], lora["learning_rate"], lora["epochs"]) == (512, 3e-4, 3.0)
    assert lora["load_in_8bit"] is True and p("05")["load_in_8bit"] is True
    for name in ("zero2", "zero3", "zero3_offload"):
        assert (ROOT / "env" / "deepspeed" / f"{name}.json").is_file()


def test_layered_profile_keeps_tiny_values_it_does_not_state():
    tiny, gpu = config.notebook_params("tiny", "00"), config.notebook_params("gpu", "00")
    assert gpu["vocab_size"] == tiny["vocab_size"]
    assert gpu["max_position"] == 2048 != tiny["max_position"]
    assert gpu["profile"] == "gpu"


def test_unknown_key_in_profile_names_it_and_lists_valid_ones(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text('"01":\n  max_len: 128\n  max_lenght: 3\n')
    with pytest.raises(ConfigError) as err:
        config.load_profile(bad)
    msg = str(err.value)
    assert "'max_lenght'" in msg and "max_len" in msg and "num_proc" in msg


@pytest.mark.parametrize("text, fragment", [
    ('"09":\n  x: 1\n', "unknown key '09'"),
    ('seeds: 1\n', "unknown key 'seeds'"),
    ('"00": [1, 2]\n', "must be a mapping"),
    ('"00":\n  vocab_size: "big"\n', "'vocab_size' must be int"),
    ('"00":\n  vocab_size: true\n', "'vocab_size' must be int"),
    ('- a\n- b\n', "must be a mapping"),
    ('"00": {vocab_size: [\n', "not valid YAML"),
])
def test_malformed_profiles_are_rejected(tmp_path, text, fragment):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        config.load_profile(path)


@pytest.mark.parametrize("name", ["nope", "../tiny", "", ".hidden", "a/b"])
def test_unknown_or_hostile_profile_names(name):
    with pytest.raises(ConfigError):
        config.load_profile(name)


def test_overrides_merge_and_are_checked():
    p = config.notebook_params("tiny", "02", {"learning_rate": 1, "max_steps": 7})
    assert p["learning_rate"] == 1.0 and isinstance(p["learning_rate"], float)
    assert p["max_steps"] == 7
    with pytest.raises(ConfigError, match="unknown key 'no_such_param'.*valid keys: .*max_steps"):
        config.notebook_params("tiny", "02", {"no_such_param": 1})
    with pytest.raises(ConfigError, match="'max_steps' must be int"):
        config.notebook_params("tiny", "02", {"max_steps": "7"})
    with pytest.raises(ConfigError, match="unknown notebook '07'"):
        config.notebook_params("tiny", "07")


def test_resolve_follows_profile_for_untouched_knobs_and_keeps_changed_ones(tmp_path):
    ns = dict(config.notebook_params("tiny", "03"))   # what the parameters cell holds
    ns.update(profile="knowlm-13b", workdir=str(tmp_path), In=[], _oh={}, np=object())
    ns["max_steps"] = 11                               # changed by hand
    cfg = config.resolve("03", ns, check=False)        # paths and CUDA: test_preflight.py
    assert cfg.lora_r == 16 and cfg.cutoff_len == 512  # from the chosen profile
    assert cfg.max_steps == 11                         # the explicit change wins
    assert cfg.workdir == tmp_path and cfg.profile == "knowlm-13b"
    with pytest.raises(AttributeError, match="not a parameter"):
        cfg.In
    ns["lora_r"] = "sixteen"
    with pytest.raises(ConfigError, match="'lora_r' must be int"):
        config.resolve("03", ns, check=False)


def test_paths_default_to_upstream_artifacts_unless_given(tmp_path):
    ns = dict(config.notebook_params("tiny", "02"), workdir=str(tmp_path))
    cfg = config.resolve("02", ns)
    assert cfg.path("base_model") == tmp_path / "00" / "base"
    assert cfg.path("dataset_prefix") == tmp_path / "01" / "pretrain_text_document"
    assert cfg.path("pretrained_model") == tmp_path / "02" / "consolidated"
    ns["base_model"] = "/models/llama-13b-hf"
    assert config.resolve("02", ns, check=False).path("base_model") == Path("/models/llama-13b-hf")
    with pytest.raises(ConfigError):
        cfg.path("nothing_like_this")
    assert config.upstream_paths("01", tmp_path) == {"tokenizer_path": str(tmp_path / "00" / "tokenizer")}
    assert config.upstream_paths("00", tmp_path) == {}
