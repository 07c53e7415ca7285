"""The preflight: path parameters and CUDA needs are checked before anything runs."""
import json
import shutil
from pathlib import Path

import pytest
from conftest import run_batch

from knowlm_nb import ROOT, batch, config, preflight
from knowlm_nb.preflight import Machine, PreflightError

CPU = Machine(gpus=0, bf16=False, cpus=2)
TINY_BASE = ROOT / "data_samples" / "tiny_base"


def test_a_path_that_exists_but_is_not_a_model_folder_is_named(tmp_path, capsys, cpu_machine):
    not_a_tokenizer = tmp_path / "notes"
    not_a_tokenizer.mkdir()
    (not_a_tokenizer / "README.md").write_text("hello")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    weights_less = tmp_path / "half"
    weights_less.mkdir()
    (weights_less / "config.json").write_text("{}")
    code, _, err = run_batch(capsys, "--profile", "gpu", "--only", "01", "02", "03",
                             "-p", "workdir", str(tmp_path / "w"),
                             "-p", "corpus_glob", "data_samples/corpus/*.jsonl",
                             "-p", "tokenizer_path", str(not_a_tokenizer),
                             "-p", "base_model", str(adapter), "-p", "precision", "fp32",
                             "-p", "load_in_8bit", "false")
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("- ")]
    tok = next(ln for ln in lines if "tokenizer_path" in ln)
    assert f"{not_a_tokenizer} has no tokenizer.json or tokenizer.model" in tok
    base = [ln for ln in lines if "base_model" in ln]
    assert len(base) == 2                            # notebooks 02 and 03 both take it
    assert all(f"{adapter} has no config.json" in ln and "holds a LoRA adapter" in ln
               and "pass it as adapter_path" in ln for ln in base)
    assert len(lines) == 3                           # corpus, precision, 8-bit fixed by -p
    # a model folder without weights is not a model folder either
    assert "no weights" in preflight.describe(weights_less, "model")
    # a dataset given with its suffix: the fix names the prefix
    (tmp_path / "d.bin").write_bytes(b"")
    assert f"give the prefix without .bin: {tmp_path / 'd'}" in preflight.describe(tmp_path / "d.bin", "dataset")


def test_cuda_only_settings_on_a_cpu_machine_are_reported_before_running(tmp_path, capsys, cpu_machine):
    work = tmp_path / "w"
    code, _, err = run_batch(capsys, "--profile", "tiny", "--only", "02", "03", "-p", "workdir", str(work),
                             "-p", "precision", "bf16", "-p", "load_in_8bit", "true")
    assert code == 2 and not work.exists()
    assert "notebook 02: precision = 'bf16' is mixed precision on CUDA GPUs" in err
    assert "-p precision fp32" in err
    assert "notebook 03: load_in_8bit = True" in err and "-p load_in_8bit false" in err
    assert "this machine: no CUDA GPU" in err


@pytest.mark.parametrize("machine, params, fragment", [
    (Machine(1, True, 8), {"num_gpus": 8}, "use -p num_gpus 1"),
    (Machine(1, False, 8), {"precision": "bf16", "num_gpus": 1}, "needs an Ampere or newer GPU"),
    (Machine(1, True, 8), {"precision": "bf16", "num_gpus": 1}, None),
    (Machine(2, True, 8), {"num_gpus": 2, "precision": "fp16"}, None),
    (Machine(1, True, 8), {"num_gpus": 8, "num_nodes": 3, "hostfile": "env/hostfile.example"}, None),
    (CPU, {"num_gpus": 2}, None),                  # on CPU the processes are gloo ranks
])
def test_gpu_count_and_precision_against_the_machine(tmp_path, machine, params, fragment):
    cfg = config.Config("02", {**config.notebook_params("tiny", "02"), **params}, tmp_path)
    bad = preflight.errors(preflight.check_machine(cfg, machine))
    if fragment is None:
        assert bad == []
    else:
        assert len(bad) == 1 and fragment in bad[0].message


def test_check_on_a_real_scale_profile_exits_2_with_the_plan(tmp_path, capsys, cpu_machine):
    code, out, _ = run_batch(capsys, "--profile", "knowlm-13b", "--check", "-p", "workdir", str(tmp_path / "w"))
    assert code == 2
    assert "ERROR     notebook 01: tokenizer_path = 'models/llama-13b-hf'" in out
    assert "hostfile: " + str(ROOT / "env" / "hostfile.example") in out     # exists: OK
    assert "nothing was run" in out and not (tmp_path / "w").exists()


def test_upstream_outside_the_run_stays_empty_and_tiny_notebooks_build_it(tmp_path, cpu_machine):
    jobs, work = batch.plan("tiny", only=["03"], overrides=[("workdir", str(tmp_path))])
    assert jobs[0].parameters["base_model"] == ""   # notebook 03 resolves "" and builds the base
    note = next(f for f in jobs[0].findings if f.parameter == "base_model")
    assert note.level == "note" and "notebook 03 builds it at tiny scale" in note.message


def test_resolve_checks_the_notebooks_own_parameters(tmp_path, cpu_machine):
    ns = dict(config.notebook_params("tiny", "02"), workdir=str(tmp_path / "w"))
    # standalone on tiny: "" paths whose artifacts are missing are built by the notebook
    assert config.resolve("02", ns).path("base_model") == tmp_path / "w" / "00" / "base"
    # an explicit path must exist, on every profile; nothing is written when it does not
    ns.update(workdir=str(tmp_path / "w2"), base_model=str(tmp_path / "nope"))
    with pytest.raises(PreflightError, match=r"notebook 02 cannot run.*\n- notebook 02: base_model = "):
        config.resolve("02", ns)
    assert not (tmp_path / "w2").exists()
    # on a real-scale profile a missing "" artifact is an error: a tiny stand-in would be wrong
    ns = dict(config.notebook_params("tiny", "02"), profile="gpu", workdir=str(tmp_path / "w3"))
    ns.update(base_model=str(TINY_BASE))
    with pytest.raises(PreflightError) as err:
        config.resolve("02", ns)
    msg = str(err.value)
    assert 'dataset_prefix = "" (the dataset_prefix notebook 01 writes)' in msg
    assert "run notebook 01 first in the same workdir" in msg and "--profile tiny" in msg
    assert "base_model" not in msg                   # the shipped tiny base is a model folder
    assert "precision = 'bf16' is mixed precision on CUDA GPUs" in msg   # the gpu profile's
    assert config.resolve("02", ns, check=False).profile == "gpu"


def test_new_notebooks_rows_cover_their_path_parameters(tmp_path):
    """04-06 take base_model, tuned_model, adapter_path, model_path: checked by name."""
    for nb in ("04", "05", "06"):
        cfg = config.Config(nb, config.notebook_params("knowlm-13b", nb), tmp_path)
        bad = {f.parameter: f.message for f in preflight.check_paths(cfg)}
        for name in ("base_model", "tuned_model", "adapter_path", "model_path"):
            if name in cfg.params and cfg.params[name]:
                assert name in bad and "does not exist" in bad[name]
    cfg = config.Config("06", config.notebook_params("knowlm-13b", "06"), tmp_path)
    msg = next(f.message for f in preflight.check_paths(cfg) if f.parameter == "adapter_path")
    assert "adapter_config.json" in msg and "-p adapter_path /path/to/zhixi-13b-lora" in msg


def _assert_project_message(exc, path):
    msg = str(exc)
    assert str(path) in msg
    assert "Repo id" not in msg and "huggingface.co" not in msg and "repo_type" not in msg


def test_a_missing_local_path_never_reaches_a_hub_client(tmp_path):
    from knowlm_nb import instruct, pretrain, tiny

    missing = tmp_path / "models" / "llama-7b-hf"
    empty = tmp_path / "empty"
    empty.mkdir()
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    shutil.copy(TINY_BASE / "config.json", only_config)
    calls = [
        lambda p: instruct.load_base(p),
        lambda p: instruct.load_adapter(TINY_BASE, p),
        lambda p: pretrain.evaluate(p, 64),
        lambda p: tiny.Zoo(p, {}).load(),
        lambda p: preflight.require(p, "model", "base_model"),
    ]
    for load in calls:
        for path in (missing, empty, only_config):
            with pytest.raises((ValueError, RuntimeError)) as err:   # the project's errors
                load(path)
            _assert_project_message(err.value, path)
    with pytest.raises(PreflightError, match="no tokenizer.json or tokenizer.model"):
        instruct.load_base(only_config)
    with pytest.raises(PreflightError, match="fix: -p base_model /path/to/llama-7b-hf"):
        preflight.require(missing, "model", "base_model")
    assert preflight.require(TINY_BASE, "model") == TINY_BASE


def test_load_adapter_reads_a_local_adapter_offline(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    from knowlm_nb import instruct

    tok, model = instruct.load_base(TINY_BASE)
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 2
    _, loaded = instruct.load_adapter(TINY_BASE, tmp_path / "adapter")
    ids = tok("Alice met Bob.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, lora.eval()(ids).logits, atol=1e-5)


def test_preflight_imports_only_shared_modules_and_not_config():
    """config.resolve calls the preflight, so the preflight must not import config (a cycle)."""
    import ast

    tree = ast.parse((ROOT / "knowlm_nb" / "preflight.py").read_text(encoding="utf-8"))
    ours = {a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level
            for a in node.names}
    assert ours <= {"ROOT", "files"}, ours
