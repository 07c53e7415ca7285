"""Notebook 02's training module: real 2-process DeepSpeed jobs, resume,
consolidation, the run's launch command, and every bad input named clearly.
The launcher and job control are in test_launch.py, the 13B sizing in test_sizing.py."""
import json
import math
import os
import shutil

import pytest

from knowlm_nb import ROOT, config, files, launch, pretrain
from knowlm_nb.pretrain import PretrainError

# Tiny jobs: 2 processes over gloo, 2 x 2 samples of 256 tokens a step each.
SMALL = {"micro_batch": 2, "grad_accum": 2, "warmup_steps": 1, "save_steps": 3, "stop_at_step": 0}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Notebook 00's base and notebook 01's dataset, built at tiny scale once."""
    root = tmp_path_factory.mktemp("pretrain")
    built = pretrain.ensure_inputs(pretrain.settings("tiny", overrides={"workdir": str(root)}),
                                   show=lambda s: None)
    assert set(built) == {"base_model", "dataset_prefix"}
    return root


def small(workdir, **overrides):
    return pretrain.settings("tiny", overrides={"workdir": str(workdir), **SMALL, **overrides})


def steps_of(log, run=None):
    return [r for r in log if run is None or r["run"] == run]


@pytest.fixture(scope="module")
def zero2_run(workdir):
    cfg = small(workdir, deepspeed_config="env/deepspeed/zero2.json", max_steps=6)
    out = workdir / "02" / "zero2"
    result = pretrain.launch(cfg, out, fresh=True, show=None)
    return cfg, out, result


@pytest.fixture(scope="module")
def zero3_run(workdir):
    """A ZeRO-3 job stopped after step 4 (SIGTERM), then resumed to step 8."""
    cfg = small(workdir, deepspeed_config="env/deepspeed/zero3.json", max_steps=8, stop_at_step=4)
    out = workdir / "02" / "zero3"
    first = pretrain.launch(cfg, out, stop_at_step=cfg.stop_at_step, fresh=True, show=None)
    checkpoint_after_stop = pretrain.last_checkpoint(out)
    second = pretrain.launch(cfg, out, resume="auto", show=None)
    return cfg, out, first, checkpoint_after_stop, second


# ------------------------------------------------------------ real jobs

def test_zero2_two_process_job_trains_and_checkpoints(zero2_run):
    cfg, out, result = zero2_run
    assert result.returncode == 0 and not result.stopped
    start = next(e for e in result.events if e["event"] == "start")
    assert (start["world_size"], start["backend"], start["zero_stage"]) == (2, "gloo", 2)
    assert start["global_batch"] == 2 * 2 * 2
    log = pretrain.read_log(out)
    assert [r["step"] for r in log] == list(range(1, 7))
    assert log[-1]["loss"] < log[0]["loss"] - 0.05, "the loss must fall"
    assert [c.name for c in sorted(out.glob("checkpoint-*"))] == ["checkpoint-3", "checkpoint-6"]
    assert pretrain.last_checkpoint(out).name == "checkpoint-6"
    assert (out / "checkpoint-6" / "global_step6").is_dir()  # DeepSpeed's own shards
    res = pretrain.read_result(out)
    assert res["global_step"] == 6 and res["zero_stage"] == 2
    assert set(res["heldout_loss"]) == {"zh", "en"}


def test_zero3_job_is_stopped_then_resumed_where_it_left_off(zero3_run):
    cfg, out, first, ckpt, second = zero3_run
    assert first.stopped and first.last_step() >= 4
    assert ckpt is not None and ckpt.name == "checkpoint-3"
    assert second.returncode == 0
    start = next(e for e in second.events if e["event"] == "start")
    assert start["zero_stage"] == 3 and start["resumed_from"] == 3
    log = pretrain.read_log(out)
    runs = list(dict.fromkeys(r["run"] for r in log))
    assert len(runs) == 2
    killed, resumed = steps_of(log, runs[0]), steps_of(log, runs[1])
    # global step continues from the checkpoint, not from 1
    assert [r["step"] for r in resumed] == list(range(4, 9))
    # the steps both launches ran are the same steps: same learning rate
    # (schedule restored), same tokens (data order restored), same loss
    # (weights and Adam moments restored)
    by_step = {r["step"]: r for r in killed}
    for r in resumed:
        if r["step"] in by_step:
            k = by_step[r["step"]]
            assert r["lr"] == pytest.approx(k["lr"], rel=1e-9)
            assert r["tokens"] == k["tokens"]
            assert r["loss"] == pytest.approx(k["loss"], abs=1e-4)
    assert resumed[-1]["loss"] < killed[0]["loss"] - 0.05
    assert pretrain.read_result(out)["global_step"] == 8


def test_consolidated_zero3_model_reloads_in_a_fresh_process_with_the_same_eval_loss(zero3_run, tmp_path):
    cfg, out, *_ = zero3_run
    ckpt = pretrain.last_checkpoint(out)
    assert ckpt.name == "checkpoint-8"
    model_dir = pretrain.consolidate(ckpt, tmp_path / "consolidated")
    names = {p.name for p in model_dir.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "consolidated.json"} <= names
    manifest = json.loads((model_dir / "consolidated.json").read_text())
    assert manifest["source"] == "zero" and manifest["global_step"] == 8
    assert not list(tmp_path.glob(".consolidated-*")), "no temporary folder left behind"
    fresh = pretrain.evaluate_in_fresh_process(model_dir, cfg.seq_len)
    in_job = pretrain.read_result(out)["heldout_loss"]
    for lang in ("zh", "en"):
        assert fresh[lang] == pytest.approx(in_job[lang], abs=1e-4)
    # fp32 on CPU: the fp32 master shards gathered equal the weights the
    # Trainer gathered into the checkpoint itself
    assert files.weights_hash(model_dir) == files.weights_hash(ckpt)


def test_plain_single_process_run_needs_no_launcher(workdir):
    """The benchmark's baseline: no DeepSpeed, one process, plain python -m."""
    cfg = small(workdir, deepspeed_config="", num_gpus=1, max_steps=2, save_steps=2)
    out = workdir / "02" / "plain"
    argv = pretrain.command_for(cfg, out / "run.yaml", out)
    assert argv[1:3] == ["-m", "knowlm_nb.pretrain"]
    result = pretrain.launch(cfg, out, fresh=True, show=None)
    assert result.returncode == 0
    start = next(e for e in result.events if e["event"] == "start")
    assert start["world_size"] == 1 and start["zero_stage"] is None
    assert pretrain.last_checkpoint(out).name == "checkpoint-2"
    assert not (pretrain.last_checkpoint(out) / "latest").exists()  # not a ZeRO checkpoint
    # consolidating a plain Trainer checkpoint copies its weights as they are
    model_dir = pretrain.consolidate(pretrain.last_checkpoint(out), workdir / "02" / "plain-model")
    manifest = json.loads((model_dir / "consolidated.json").read_text())
    assert manifest["source"] == "trainer" and manifest["global_step"] == 2
    assert manifest["weights_sha256"] == files.weights_hash(pretrain.last_checkpoint(out))


def test_cli_consolidate_and_evaluate(zero2_run, tmp_path, capsys):
    cfg, out, _ = zero2_run
    assert pretrain.main(["--consolidate", str(out / "checkpoint-6"), "--out",
                          str(tmp_path / "m")]) == 0
    assert pretrain.main(["--evaluate", str(tmp_path / "m"), "--seq_len", str(cfg.seq_len)]) == 0
    event = launch.parse_event(capsys.readouterr().out.splitlines()[-1])
    assert event["heldout_loss"]["zh"] == pytest.approx(
        pretrain.read_result(out)["heldout_loss"]["zh"], abs=1e-4)


# ------------------------------------------------------- launch command

def test_knowlm_profile_command_uses_the_example_hostfile(tmp_path):
    cfg = pretrain.settings("knowlm-13b")
    argv = pretrain.command_for(cfg, tmp_path / "run.yaml", tmp_path / "run")
    i = argv.index("--hostfile")
    assert argv[i + 1] == str(ROOT / "env" / "hostfile.example")
    assert argv[argv.index("--num_nodes") + 1] == "3" and argv[argv.index("--num_gpus") + 1] == "8"
    assert argv[argv.index("--master_addr") + 1] == "node1"
    assert argv[-6:] == ["--config", str(tmp_path / "run.yaml"), "--output_dir",
                         str(tmp_path / "run"), "--resume", "auto"]


def test_bad_hostfile_stops_the_run_before_launching(workdir, tmp_path):
    bad = tmp_path / "hostfile"
    bad.write_text("node1 slots=2\nnode2 slots = 2\n", encoding="utf-8")
    cfg = small(workdir, hostfile=str(bad))
    with pytest.raises(PretrainError, match=r"hostfile:2: expected 'HOSTNAME slots=N'"):
        pretrain.check_inputs(cfg)
    assert pretrain.main(["--profile", "tiny", "--hostfile", str(bad), "--dry_run"]) == 2


# ---------------------------------------------------------- bad input

def test_missing_dataset_is_named(workdir, tmp_path):
    cfg = small(workdir, dataset_prefix=str(tmp_path / "nothing"))
    with pytest.raises(PretrainError, match=r"dataset not found: .*nothing\.bin and .*nothing\.idx missing"):
        pretrain.check_inputs(cfg)
    # the entry point says the same on stderr and exits 2, before any training
    run_yaml = pretrain.write_run_config(cfg, tmp_path / "run.yaml")
    assert pretrain.main(["--config", str(run_yaml), "--num_gpus", "1",
                          "--deepspeed_config", "", "--output_dir", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o" / pretrain.LOG_FILE).exists()


def test_truncated_dataset_is_named(workdir, tmp_path):
    prefix = workdir / config.ARTIFACTS["01"]["dataset_prefix"]
    for ext in (".bin", ".idx"):
        shutil.copy(str(prefix) + ext, tmp_path / f"d{ext}")
    with open(tmp_path / "d.bin", "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(PretrainError, match="cannot be read: .*truncated"):
        pretrain.check_inputs(small(workdir, dataset_prefix=str(tmp_path / "d")))


def test_seq_len_above_the_models_positions(workdir):
    with pytest.raises(PretrainError, match=r"seq_len 1024 is above the model's 512 positions"):
        pretrain.check_inputs(small(workdir, seq_len=1024))


def test_seq_len_below_the_datasets_samples(workdir):
    with pytest.raises(PretrainError, match=r"samples of 256 tokens, longer than seq_len 128"):
        pretrain.check_inputs(small(workdir, seq_len=128))


def test_missing_base_model(workdir, tmp_path):
    with pytest.raises(PretrainError, match="base model not found"):
        pretrain.check_inputs(small(workdir, base_model=str(tmp_path)))


def write_json(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("change, message", [
    ({"train_batch_size": 64}, r"train_batch_size is 64 but the run has 8"),
    ({"train_micro_batch_size_per_gpu": 4}, r"train_micro_batch_size_per_gpu is 4 but the run has 2"),
    ({"gradient_accumulation_steps": 1, "train_batch_size": 8},
     r"gradient_accumulation_steps is 1 but the run has 2"),
])
def test_deepspeed_config_batch_sizes_must_agree(workdir, tmp_path, change, message):
    ds = json.loads((ROOT / "env" / "deepspeed" / "zero2.json").read_text())
    ds.update(change)
    cfg = small(workdir, deepspeed_config=write_json(tmp_path / "ds.json", ds))
    with pytest.raises(PretrainError, match=message) as exc:
        pretrain.check_inputs(cfg)
    assert "micro_batch 2 x grad_accum 2 x 2 processes = 8" in str(exc.value)


def test_deepspeed_config_that_agrees_passes(workdir, tmp_path):
    ds = json.loads((ROOT / "env" / "deepspeed" / "zero3.json").read_text())
    ds.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2, train_batch_size=8)
    info = pretrain.check_inputs(small(workdir, deepspeed_config=write_json(tmp_path / "ds.json", ds)))
    assert info["deepspeed"]["zero_stage"] == 3 and info["global_batch"] == 8


@pytest.mark.parametrize("content, message", [
    ("{not json", r"not valid JSON \(line 1"),
    ("[1, 2]", "must be a JSON object"),
    ('{"zero_optimization": {"stage": 7}}', r"zero_optimization.stage must be 0-3, got 7"),
    ('{"zero_optimization": {"stage": 2}, "fp16": {"enabled": true}}', "fp16.enabled is true but precision is fp32"),
])
def test_bad_deepspeed_config_file(workdir, tmp_path, content, message):
    (tmp_path / "ds.json").write_text(content)
    with pytest.raises(PretrainError, match=message):
        pretrain.check_inputs(small(workdir, deepspeed_config=str(tmp_path / "ds.json")))
    with pytest.raises(PretrainError, match="DeepSpeed config not found"):
        pretrain.check_inputs(small(workdir, deepspeed_config=str(tmp_path / "none.json")))


@pytest.mark.parametrize("overrides, message", [
    ({"micro_batch": 0}, "micro_batch must be >= 1"),
    ({"max_steps": 0}, "max_steps must be >= 1"),
    ({"stop_at_step": 8, "max_steps": 8}, "stop_at_step must be 0"),
    ({"learning_rate": -1.0}, "learning_rate must be > 0"),
    ({"adam_beta2": 1.0}, r"adam_beta2 must be in \[0, 1\)"),
    ({"launcher": "mpirun"}, "launcher must be one of"),
    ({"precision": "fp8"}, "precision must be one of"),
    ({"precision": "fp16"}, "precision fp16 needs a GPU"),
    ({"lr_scheduler": "wobbly"}, "lr_scheduler 'wobbly' is not a transformers scheduler"),
    ({"num_nodes": 2}, "num_nodes 2 needs a hostfile"),
])
def test_bad_numbers_and_names(workdir, overrides, message):
    with pytest.raises(PretrainError, match=message):
        pretrain.check_inputs(small(workdir, **overrides), cuda=False)


def test_unknown_or_mistyped_parameters(tmp_path):
    with pytest.raises(config.ConfigError, match="unknown key 'max_stepz'"):
        pretrain.settings("tiny", overrides={"max_stepz": 3})
    with pytest.raises(config.ConfigError, match="'max_steps' must be int"):
        pretrain.settings("tiny", overrides={"max_steps": "many"})
    assert pretrain.main(["--profile", "tiny", "--max_steps", "many", "--dry_run"]) == 2
    bad = tmp_path / "run.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(PretrainError, match="must be a mapping"):
        pretrain.settings(config_file=bad)
    with pytest.raises(PretrainError, match="run config not found"):
        pretrain.settings(config_file=tmp_path / "none.yaml")


def test_run_config_round_trips_with_absolute_paths(workdir, tmp_path):
    cfg = small(workdir, max_steps=5)
    path = pretrain.write_run_config(cfg, tmp_path / "run.yaml")
    again = pretrain.settings(config_file=path)
    assert again.max_steps == 5 and again.micro_batch == 2
    assert again.path("base_model") == cfg.path("base_model")
    assert again.path("deepspeed_config") == ROOT / cfg.deepspeed_config
    assert again.path("base_model").is_absolute()
    # CLI overrides win over the file
    assert pretrain.settings(config_file=path, overrides={"max_steps": 9}).max_steps == 9


def test_resume_refuses_what_is_not_a_checkpoint(tmp_path):
    (tmp_path / "checkpoint-5").mkdir()  # cut short: no completion marker
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / pretrain.COMPLETE_MARKER).write_text("{}")
    assert pretrain.last_checkpoint(tmp_path).name == "checkpoint-2"
    assert pretrain.last_checkpoint(tmp_path / "none") is None
    assert pretrain.resume_point(tmp_path, "auto").name == "checkpoint-2"
    with pytest.raises(PretrainError, match="already holds checkpoints"):
        pretrain.resume_point(tmp_path, "never")
    assert pretrain.resume_point(tmp_path / "none", "never") is None
    with pytest.raises(PretrainError, match="not a checkpoint to resume from"):
        pretrain.resume_point(tmp_path, str(tmp_path / "checkpoint-5"))
    with pytest.raises(PretrainError, match="not a checkpoint"):
        pretrain.consolidate(tmp_path / "checkpoint-5", tmp_path / "out")
    assert not (tmp_path / "out").exists()

# ------------------------------------------------------------ DeepSpeed

def test_deepspeed_accepts_our_configs():
    from deepspeed.runtime.config import DeepSpeedConfig

    for path in sorted((ROOT / "env" / "deepspeed").glob("*.json")):
        ds = json.loads(path.read_text())
        assert all(ds[k] == "auto" for k in pretrain.BATCH_KEYS), path.name
        filled = json.loads(json.dumps(ds).replace('"auto"', "1"))  # as the Trainer would
        filled.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2,
                      train_batch_size=4, fp16={"enabled": False}, bf16={"enabled": False})
        if "optimizer" in filled:
            filled["optimizer"]["params"].update(betas=[0.9, 0.95], lr=1e-4)
        parsed = DeepSpeedConfig(filled)  # DeepSpeed's own validation: no unknown keys
        assert parsed.zero_optimization_stage == {"zero2.json": 2}.get(path.name, 3)
    offload = json.loads((ROOT / "env" / "deepspeed" / "zero3_offload.json").read_text())
    # offloading the optimizer needs DeepSpeed's own (CPU) Adam, not a client optimizer
    assert offload["optimizer"]["type"] == "AdamW"


# ------------------------------------------------------------ held out

def test_heldout_text_is_not_in_the_pretraining_corpus():
    glob = config.notebook_params("tiny", "01")["corpus_glob"]
    corpus = [rec["text"] for path in files.find_files(glob) for rec in files.read_jsonl(path)]
    assert len(corpus) == 500
    for lang in pretrain.HELDOUT:
        texts = pretrain.heldout_texts(lang)
        assert len(texts) >= 50 and len(set(texts)) == len(texts)
        assert not [t for t in texts if any(t in doc for doc in corpus)]


def test_perplexity():
    assert pretrain.perplexities({"zh": 0.0, "en": math.log(10)}) == pytest.approx({"zh": 1.0, "en": 10.0})
