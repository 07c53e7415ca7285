import json
import os

import nbformat
import pytest
from conftest import run_batch
from nbformat.v4 import new_code_cell, new_notebook

from knowlm_nb import ROOT, batch, config, preflight


def make_nb(path, params: dict, body: list[str], tag=True):
    src = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    cells = [new_code_cell(src, metadata={"tags": ["parameters"]} if tag else {})]
    cells += [new_code_cell(b) for b in body]
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


RECORD = ("from knowlm_nb import config, report\n"
          "cfg = config.resolve('{nb}', locals())\n"
          "report.record('seen_max_len', cfg.max_len)\n"
          "report.record('seen_tokenizer', cfg.tokenizer_path)")


@pytest.fixture
def fake_notebooks(tmp_path):
    d = tmp_path / "nbs"
    d.mkdir()
    make_nb(d / "00_ok.ipynb", config.notebook_params("tiny", "00"),
            ["from knowlm_nb import config, report\n"
             "cfg = config.resolve('00', locals())\n"
             "report.record('vocab', cfg.vocab_size)\n"
             "(cfg.workdir / '00' / 'tokenizer').mkdir(parents=True)  # the artifact 01 expects\n"
             "(cfg.workdir / '00' / 'tokenizer' / 'tokenizer.json').write_text('{}')"])
    make_nb(d / "01_fails.ipynb", config.notebook_params("tiny", "01"),
            [RECORD.format(nb="01"), "x = 1", "raise ValueError('boom in cell three')"])
    make_nb(d / "02_after.ipynb", config.notebook_params("tiny", "02"), ["y = 2"])
    return d


def test_unknown_parameter_fails_before_anything_runs(tmp_path, capsys):
    work = tmp_path / "work"
    code = batch.main(["--profile", "tiny", "-p", "no_such_param", "1",
                       "-p", "workdir", str(work), "--no-progress"])
    assert code != 0
    assert "no_such_param" in capsys.readouterr().err
    assert not work.exists()


@pytest.mark.parametrize("argv, fragment", [
    (["--profile", "nope"], "unknown profile 'nope'"),
    (["--only", "42"], "do not exist: ['42']"),
    (["--only", "x1"], "two-digit"),
    (["-p", "vocab_size", "many"], "'vocab_size' must be int"),
    (["-p", "vocab_size", "[1, 2"], "not a valid value"),
    (["-p", "profile", "gpu"], "--profile NAME"),
])
def test_bad_arguments_are_named(argv, fragment, capsys, tmp_path):
    assert batch.main(argv + ["-p", "workdir", str(tmp_path / "w"), "--no-progress"]) == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_notebook_without_parameters_cell_or_with_missing_names(tmp_path):
    d = tmp_path / "nbs"
    d.mkdir()
    make_nb(d / "00_untagged.ipynb", {"profile": "tiny"}, [], tag=False)
    with pytest.raises(batch.BatchError, match="no cell tagged 'parameters'"):
        batch.plan("tiny", notebooks_dir=d)
    (d / "00_untagged.ipynb").unlink()
    make_nb(d / "00_short.ipynb", {"profile": "tiny", "workdir": "", "seed": 0}, [])
    with pytest.raises(batch.BatchError, match="lacks .*'vocab_size'"):
        batch.plan("tiny", notebooks_dir=d)


def test_plan_passes_profile_upstream_paths_and_overrides(fake_notebooks, tmp_path):
    jobs, workdir = batch.plan("knowlm-13b", overrides=[("max_len", "64"), ("workdir", str(tmp_path / "w"))],
                               notebooks_dir=fake_notebooks, strict=False,
                               machine=preflight.Machine(gpus=0, bf16=False, cpus=2))
    assert workdir == tmp_path / "w"
    by = {j.notebook: j.parameters for j in jobs}
    assert by["01"]["max_len"] == 64                               # override, typed
    assert by["01"]["tokenizer_path"] == "models/llama-13b-hf"     # explicit profile path kept
    assert by["02"]["dataset_prefix"] == str(workdir / "01" / "pretrain_text_document")  # upstream
    assert by["02"]["micro_batch"] == 20 and all(p["workdir"] == str(workdir) for p in by.values())
    # the preflight's findings stay with the jobs (strict=False); strict, they raise
    errors = {(f.notebook, f.parameter) for j in jobs for f in j.findings if f.level == "error"}
    assert errors == {("01", "corpus_glob"), ("01", "tokenizer_path"), ("02", "base_model"),
                      ("02", "precision")}
    with pytest.raises(preflight.PreflightError, match="tokenizer_path = 'models/llama-13b-hf'"):
        batch.plan("knowlm-13b", notebooks_dir=fake_notebooks)


def test_failing_notebook_stops_the_run_and_names_notebook_and_cell(fake_notebooks, tmp_path, capsys):
    work = tmp_path / "w"
    code = batch.main(["--profile", "tiny", "-p", "workdir", str(work), "-p", "max_len", "77",
                       "--notebooks-dir", str(fake_notebooks), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert "01_fails.ipynb failed at cell" in err and "ValueError: boom in cell three" in err
    assert "starting \"raise ValueError('boom in cell three')\"" in err
    summary = json.loads((work / "summary.json").read_text())
    status = {r["notebook"]: r["status"] for r in summary["notebooks"]}
    assert status == {"00_ok.ipynb": "ok", "01_fails.ipynb": "failed", "02_after.ipynb": "not run"}
    figures = {r["notebook"]: r["metrics"] for r in summary["notebooks"]}
    assert figures["00_ok.ipynb"] == {"vocab": 2000}
    # the parameter and the upstream path reached the notebook before it failed
    assert figures["01_fails.ipynb"] == {"seen_max_len": 77,
                                         "seen_tokenizer": str(work / "00" / "tokenizer")}
    assert (work / "executed" / "01_fails.ipynb").is_file()
    assert "| 01_fails.ipynb | failed |" in (work / "summary.md").read_text()


def test_real_notebook_00_runs_under_papermill_with_other_parameters(tmp_path, capsys):
    work = tmp_path / "w"
    code = batch.main(["--profile", "tiny", "--only", "00", "-p", "workdir", str(work),
                       "-p", "vocab_size", "700", "-p", "num_layers", "2", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    figures = json.loads((work / "summary.json").read_text())["notebooks"][0]["metrics"]
    assert figures["vocab_size"] <= 700
    zoo = json.loads((work / "00" / "zoo.json").read_text())
    assert zoo["recipe"]["vocab_size"] == 700 and zoo["recipe"]["num_layers"] == 2
    assert figures["parameters"] == zoo["parameters"]
    assert "tokens_per_char_zh" in (work / "summary.md").read_text()


def test_gpu_profile_with_a_missing_model_folder_stops_before_any_notebook(tmp_path, capsys, cpu_machine):
    work = tmp_path / "w"
    code, _, err = run_batch(capsys, "--profile", "gpu", "-p", "workdir", str(work))
    assert code == 2
    assert not work.exists()                       # nothing ran, nothing was written
    line = next(ln for ln in err.splitlines() if "tokenizer_path" in ln)
    assert "'models/llama-7b-hf'" in line and str(ROOT / "models" / "llama-7b-hf") in line
    assert "does not exist" in line and "tokenizer.json or tokenizer.model" in line
    assert "-p tokenizer_path /path/to/llama-7b-hf" in line and "--profile tiny" in line
    # every problem at once, not just the first
    assert "notebook 02: base_model = 'models/llama-7b-hf'" in err
    assert "notebook 01: corpus_glob = 'data/pretrain/*.jsonl': no file matches" in err
    assert "Repo id" not in err



def test_check_on_tiny_prints_the_plan_and_exits_0(tmp_path, capsys, cpu_machine):
    work = tmp_path / "w"
    code, out, err = run_batch(capsys, "--profile", "tiny", "--check", "-p", "workdir", str(work))
    assert code == 0, err
    assert not work.exists()                        # --check runs and writes nothing
    assert out.startswith(f"plan: profile 'tiny', workdir {work}")
    for path in batch.discover():
        assert path.name in out
    assert f"writes    : tokenizer -> {work / '00' / 'tokenizer'}" in out
    assert f"tokenizer_path: {work / '00' / 'tokenizer'}, written by notebook 00 earlier in this run" in out
    assert "vocab_size=2000" in out and "precision = 'fp32': runs on this machine" in out
    assert "ERROR" not in out and out.rstrip().endswith("preflight: OK, ready to run (nothing was run).")
