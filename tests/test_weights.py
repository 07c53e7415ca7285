"""Stage 04: weight diffs, streamed recovery, LoRA merge, manifests, atomic output, hostile files."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from knowlm_nb import ROOT, decoding, files, instruct, weights
from knowlm_nb.weights import WeightsError

TOKENIZER = ROOT / "data_samples" / "tiny_base"


def save_llama(folder: Path, seed: int = 0, vocab: int = 2000) -> Path:
    """A small random Llama (with the shipped tokenizer) saved as a HF folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tuned_from(base: Path, out: Path, noise: float = 1e-3, seed: int = 1, **changes) -> dict:
    """A 'continued-pretrained' copy of ``base``: every tensor nudged; ``changes`` replace some."""
    sd = load_file(base / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    tuned = {k: v + noise * torch.randn(v.shape, generator=g) for k, v in sd.items()}
    tuned.update(changes)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tuned, str(out / "model.safetensors"), metadata={"format": "pt"})
    weights.copy_side_files(base, out)
    return tuned


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    base = save_llama(root / "base")
    sd = load_file(base / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    tuned = tuned_from(base, root / "tuned",
                       **{name: sd[name] * 0.3 + 0.02 * torch.randn(sd[name].shape),  # moved a lot
                          "extra.only_in_tuned": torch.arange(12, dtype=torch.int64).view(3, 4)})
    return base, root / "tuned", tuned, name


def hidden_siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}-"))


# ----------------------------------------------------------------- hashing

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_streamed_hash_is_files_tensor_sha256(dtype):
    t = (torch.randn(37, 11) * 100).to(dtype)
    h = weights.TensorHash(t.dtype, t.shape)
    for a in range(0, 37, 5):
        h.update(t[a:a + 5])
    assert h.hexdigest() == files.tensor_sha256(t)


# ------------------------------------------------------- diff and recovery

def test_fp32_diff_then_recover_is_bit_exact_and_loads(pair, tmp_path):
    base, tuned_dir, tuned, moved = pair
    m = weights.make_diff(base, tuned_dir, tmp_path / "diff", shard_mb=0.1, chunk_mb=0.05)
    assert m["exact"] and m["max_abs_error"] == 0.0
    assert m["stored_whole"] == ["extra.only_in_tuned"]
    # elements of the tensor that moved a lot would not round back in fp32: a sparse patch
    idx, val = weights.patch_names(moved)
    assert m["diff"][idx]["mode"] == "patch" and 0 < m["patched_elements"] < tuned[moved].numel() / 2
    assert m["diff"][moved]["mode"] == "diff"
    assert len(list((tmp_path / "diff").glob("model-*.safetensors"))) > 1  # sharded, with index
    assert (tmp_path / "diff" / "model.safetensors.index.json").is_file()
    assert set(m["base"]) == set(tuned) - {"extra.only_in_tuned"}
    res = weights.recover(base, tmp_path / "diff", tmp_path / "rec", shard_mb=0.1, chunk_mb=0.05)
    assert res["tensors"] == len(tuned)
    rec = weights.Checkpoint(tmp_path / "rec")
    for name, t in tuned.items():
        got = rec.tensor(name)
        assert got.dtype == t.dtype and torch.equal(got, t), name
        assert m["tensors"][name]["sha256"] == files.tensor_sha256(t)
    assert weights.verify(tmp_path / "rec", tmp_path / "diff" / "manifest.json")["ok"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "rec", local_files_only=True)
    assert torch.equal(model.lm_head.weight.detach(), tuned["lm_head.weight"])
    AutoTokenizer.from_pretrained(tmp_path / "rec", local_files_only=True)  # tokenizer copied
    assert hidden_siblings(tmp_path / "rec") == []


def test_plain_subtraction_would_not_be_exact_for_a_tensor_that_moved_a_lot(pair):
    base, _, tuned, moved = pair
    b = load_file(base / "model.safetensors")[moved]
    assert not torch.equal(b + (tuned[moved] - b), tuned[moved])  # why make_diff patches it


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_diffs_are_half_the_size_and_stay_within_the_reported_error(pair, tmp_path, dtype):
    base, tuned_dir, tuned, _ = pair
    m32 = weights.make_diff(base, tuned_dir, tmp_path / "d32")
    m = weights.make_diff(base, tuned_dir, tmp_path / "d", dtype=dtype, shard_mb=0.1)
    assert m["diff_bytes"] < 0.6 * m32["diff_bytes"]
    assert not m["exact"] and 0 < m["max_abs_error"] < (1e-4 if dtype == "float16" else 1e-3)
    weights.recover(base, tmp_path / "d", tmp_path / "rec")
    rec = weights.Checkpoint(tmp_path / "rec")
    worst = max((rec.tensor(n).double() - t.double()).abs().max().item() for n, t in tuned.items())
    assert worst == pytest.approx(m["max_abs_error"], rel=1e-6)  # the reported error is the true one


def test_the_original_sum_check_is_weak_and_fails_in_fp16(pair, tmp_path):
    base, _, _, _ = pair
    # a different model with the same sum: swap two rows of one matrix
    sd = load_file(base / "model.safetensors")
    w = sd["model.layers.1.self_attn.q_proj.weight"]
    sd["model.layers.1.self_attn.q_proj.weight"] = w[[1, 0, *range(2, w.shape[0])]]
    (tmp_path / "swapped").mkdir()
    save_file(sd, str(tmp_path / "swapped" / "model.safetensors"))
    assert weights.weight_sum(tmp_path / "swapped", torch.float64) == pytest.approx(
        weights.weight_sum(base, torch.float64), abs=1e-9)
    assert files.weights_hash(tmp_path / "swapped") != files.weights_hash(base)
    big = {"w": torch.full((300, 300), 2.0)}  # 180,000 > fp16's max 65,504
    (tmp_path / "big").mkdir()
    save_file(big, str(tmp_path / "big" / "model.safetensors"))
    assert weights.weight_sum(tmp_path / "big", torch.float16) == float("inf")


# ------------------------------------------------------ refusals, no output

def corrupt_copy(base: Path, out: Path, **changes) -> Path:
    shutil.copytree(base, out)
    sd = load_file(out / "model.safetensors")
    for k, v in changes.items():
        if v is None:
            sd.pop(k.replace("__", "."))
        else:
            sd[k.replace("__", ".")] = v
    save_file(sd, str(out / "model.safetensors"))
    return out


@pytest.mark.parametrize("change, message", [
    ("value", "tensor 'model.layers.1.self_attn.v_proj.weight' does not match the manifest"),
    ("dtype", "tensor 'model.layers.1.self_attn.v_proj.weight' is float16"),
    ("shape", "tensor 'model.layers.1.self_attn.v_proj.weight' is float32 \\[32, 31\\]"),
    ("missing", "missing tensor 'model.layers.1.self_attn.v_proj.weight'"),
])
def test_a_wrong_base_is_refused_before_anything_is_written(pair, tmp_path, change, message):
    base, tuned_dir, _, _ = pair
    weights.make_diff(base, tuned_dir, tmp_path / "diff")
    name = "model__layers__1__self_attn__v_proj__weight"
    w = load_file(base / "model.safetensors")[name.replace("__", ".")]
    new = {"value": w.clone().index_put_((torch.tensor([0]), torch.tensor([0])), torch.tensor(0.5)),
           "dtype": w.half(), "shape": w[:, :31].contiguous(), "missing": None}[change]
    wrong = corrupt_copy(base, tmp_path / "wrong", **{name: new})
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(WeightsError, match=message):
        weights.recover(wrong, tmp_path / "diff", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # not even a scratch folder


def test_a_corrupt_diff_tensor_is_caught_and_nothing_appears(pair, tmp_path):
    base, tuned_dir, _, _ = pair
    weights.make_diff(base, tuned_dir, tmp_path / "diff")
    shard = tmp_path / "diff" / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x40  # one flipped bit, same size
    shard.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="does not match its manifest"):
        weights.recover(base, tmp_path / "diff", tmp_path / "out")
    assert not (tmp_path / "out").exists() and hidden_siblings(tmp_path / "out") == []


def test_a_truncated_shard_is_a_clear_error(pair, tmp_path):
    base, tuned_dir, _, _ = pair
    weights.make_diff(base, tuned_dir, tmp_path / "diff", shard_mb=0.1)
    shard = sorted((tmp_path / "diff").glob("model-*.safetensors"))[1]
    size = shard.stat().st_size
    with open(shard, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(WeightsError, match=f"{shard.name}: truncated: the file has {size // 2} bytes"):
        weights.recover(base, tmp_path / "diff", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "tiny.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(WeightsError, match="truncated safetensors file"):
        weights.Checkpoint(tmp_path / "tiny.safetensors")
    with pytest.raises(WeightsError, match="no checkpoint at"):
        weights.Checkpoint(tmp_path / "nowhere")


def test_verify_names_the_tensor_that_differs(pair, tmp_path):
    base, tuned_dir, _, _ = pair
    weights.make_diff(base, tuned_dir, tmp_path / "diff")
    weights.recover(base, tmp_path / "diff", tmp_path / "rec")
    sd = load_file(tmp_path / "rec" / "model.safetensors")
    sd["model.norm.weight"] = sd["model.norm.weight"] * 1.0001
    save_file(sd, str(tmp_path / "rec" / "model.safetensors"))
    with pytest.raises(WeightsError, match="tensor 'model.norm.weight' does not match"):
        weights.verify(tmp_path / "rec", tmp_path / "diff")


# ------------------------------------------------ KnowLM's .bin shards, pickles

def save_bin_shards(state: dict, folder: Path, n: int = 2) -> Path:
    folder.mkdir(parents=True)
    names = list(state)
    per = -(-len(names) // n)
    weight_map = {}
    for i in range(n):
        fname = f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin"
        part = {k: state[k] for k in names[i * per:(i + 1) * per]}
        torch.save(part, folder / fname)
        weight_map.update({k: fname for k in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def test_knowlm_bin_shards_are_read_as_base_and_as_diff(pair, tmp_path):
    base, tuned_dir, tuned, _ = pair
    bin_base = save_bin_shards(load_file(base / "model.safetensors"), tmp_path / "bin_base")
    weights.copy_side_files(base, bin_base)
    m = weights.make_diff(bin_base, tuned_dir, tmp_path / "diff")
    ref = weights.make_diff(base, tuned_dir, tmp_path / "diff_st")
    assert m["base"] == ref["base"] and m["tensors"] == ref["tensors"]
    # a diff shipped as .bin shards (as KnowLM did), with the manifest beside it
    d = weights.Checkpoint(tmp_path / "diff")
    bin_diff = save_bin_shards({n: d.tensor(n) for n in d.names}, tmp_path / "bin_diff", n=3)
    shutil.copy(tmp_path / "diff" / "manifest.json", bin_diff)
    weights.recover(bin_base, bin_diff, tmp_path / "rec")
    rec = weights.Checkpoint(tmp_path / "rec")
    assert all(torch.equal(rec.tensor(n), t) for n, t in tuned.items())


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_and_never_runs(pair, tmp_path):
    base, tuned_dir, _, _ = pair
    evil = Payload()
    evil.marker = tmp_path / "pwned"
    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "x": evil},
               folder / "pytorch_model-00001-of-00001.bin")
    with pytest.raises(WeightsError, match="refused: not a plain tensor file"):
        weights.make_diff(folder, tuned_dir, tmp_path / "diff")
    with pytest.raises(WeightsError, match="refused"):
        weights.load_bin(folder / "pytorch_model-00001-of-00001.bin")
    assert not evil.marker.exists() and not (tmp_path / "diff").exists()


def test_a_truncated_bin_shard_is_a_clear_error(pair, tmp_path):
    base, _, _, _ = pair
    folder = save_bin_shards(load_file(base / "model.safetensors"), tmp_path / "b", n=1)
    shard = folder / "pytorch_model-00001-of-00001.bin"
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size // 2)
    with pytest.raises(WeightsError, match="truncated or corrupt .bin checkpoint"):
        weights.Checkpoint(folder)


# ---------------------------------------------------------- kill -9 midway

def test_kill_minus_9_midway_leaves_nothing_complete_and_a_rerun_succeeds(tmp_path):
    base, tuned = weights.synthetic_pair(tmp_path / "pair", n_tensors=6, tensor_mb=6, shard_mb=8)
    weights.make_diff(base, tuned, tmp_path / "diff", shard_mb=8)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "knowlm_nb.weights", "recover", "--base", str(base),
           "--diff", str(tmp_path / "diff"), "--out", str(out), "--shard-mb", "2", "--chunk-mb", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 120
    seen = []
    while time.time() < deadline and proc.poll() is None:
        scratch = [p for p in tmp_path.iterdir() if p.name.startswith(".out-")]
        seen = [f for s in scratch for f in s.glob("model-*.safetensors")]
        if len(seen) >= 2:  # a few shards written, more to come
            break
        time.sleep(0.005)
    assert proc.poll() is None, "recovery finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert seen and not out.exists()          # nothing at OUT, complete-looking or not
    assert hidden_siblings(out)               # the half-written work is in a hidden scratch folder
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr
    assert weights.verify(out, tmp_path / "diff")["ok"]
    t = weights.Checkpoint(tuned)
    o = weights.Checkpoint(out)
    assert all(torch.equal(o.tensor(n), t.tensor(n)) for n in t.names)


# -------------------------------------------------------------- merge-lora

@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = save_llama(root / "base", seed=3)
    _, model = instruct.load_base(base)
    model = instruct.lora_model(model, r=4, alpha=8, dropout=0.0,
                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                "gate_proj", "up_proj", "down_proj"],
                                modules_to_save=["embed_tokens", "lm_head"])
    torch.manual_seed(4)
    with torch.no_grad():  # a trained-looking adapter: B non-zero, the copies moved
        for n, p in model.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(root / "adapter")
    return base, root / "adapter"


def test_merge_lora_equals_peft_merge_and_unload_with_modules_to_save(adapter, tmp_path):
    base, adapter_dir = adapter
    m = weights.merge_lora(base, adapter_dir, tmp_path / "merged", shard_mb=0.1)
    assert m["replaced"] == ["lm_head.weight", "model.embed_tokens.weight"]
    assert len(m["merged"]) == 2 * 7 and m["scale"] == 2.0
    _, peft_model = instruct.load_adapter(base, adapter_dir)
    ref = peft_model.merge_and_unload().state_dict()
    got = weights.Checkpoint(tmp_path / "merged")
    assert set(got.names) == set(ref)
    worst = max((got.tensor(n) - ref[n]).abs().max().item() for n in ref)
    assert worst < 1e-5
    base_sd = load_file(base / "model.safetensors")
    assert not torch.equal(got.tensor("lm_head.weight"), base_sd["lm_head.weight"])
    assert weights.verify(tmp_path / "merged", tmp_path / "merged" / "manifest.json")["ok"]


def test_merged_model_answers_as_base_plus_adapter(adapter, tmp_path):
    base, adapter_dir = adapter
    weights.merge_lora(base, adapter_dir, tmp_path / "merged")
    tok, peft_model = instruct.load_adapter(base, adapter_dir)
    _, merged = instruct.load_base(tmp_path / "merged")
    prompts = ["Alice met Bob in Paris.", "张三在北京工作。", "def f(x):", "The weather"]
    a = decoding.generate(peft_model, tok, prompts, max_new_tokens=12)
    b = decoding.generate(merged, tok, prompts, max_new_tokens=12)
    assert a == b and any(a)


def test_merge_lora_refuses_an_adapter_that_does_not_fit(adapter, tmp_path):
    base, adapter_dir = adapter
    other = save_llama(tmp_path / "other", vocab=2000)
    cfg = json.loads((other / "config.json").read_text())
    bad = tmp_path / "bad_adapter"
    shutil.copytree(adapter_dir, bad)
    sd = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in sd if "q_proj.lora_A" in k)
    sd[key] = torch.zeros(4, cfg["hidden_size"] + 1)
    save_file(sd, str(bad / "adapter_model.safetensors"))
    with pytest.raises(WeightsError, match="does not fit the weight"):
        weights.merge_lora(base, bad, tmp_path / "out")
    with pytest.raises(WeightsError, match="no LoRA adapter at"):
        weights.merge_lora(base, tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------- CLI

def test_cli_round_trip_and_errors(pair, tmp_path):
    base, tuned_dir, _, _ = pair
    run = lambda *a: subprocess.run([sys.executable, "-m", "knowlm_nb.weights", *map(str, a)],  # noqa: E731
                                    cwd=ROOT, capture_output=True, text=True,
                                    env={**os.environ, "PYTHONPATH": str(ROOT)})
    r = run("make-diff", "--base", base, "--tuned", tuned_dir, "--out", tmp_path / "d")
    assert r.returncode == 0 and json.loads(r.stdout)["exact"] is True
    r = run("recover", "--base", tuned_dir, "--diff", tmp_path / "d", "--out", tmp_path / "r")
    assert r.returncode == 2 and "does not match the manifest" in r.stderr
    assert "right base model" in r.stderr and not (tmp_path / "r").exists()
    r = run("recover", "--base", base, "--diff", tmp_path / "d", "--out", tmp_path / "r")
    assert r.returncode == 0, r.stderr
    r = run("verify", "--model", tmp_path / "r", "--manifest", tmp_path / "d" / "manifest.json")
    assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True
    r = run("verify", "--model", tmp_path / "r", "--manifest", tmp_path / "nope.json")
    assert r.returncode == 2 and "no manifest at" in r.stderr


# ------------------------------------------------- standalone notebook inputs

def test_missing_upstream_models_get_stand_ins_and_say_so(tmp_path, monkeypatch):
    from knowlm_nb import config

    made, said = [], []
    monkeypatch.setattr(weights, "stand_in_tuned", lambda base, out: made.append(("tuned", out)))
    monkeypatch.setattr(weights, "stand_in_adapter", lambda base, out: made.append(("adapter", out)))
    (tmp_path / "00" / "base").mkdir(parents=True)
    (tmp_path / "00" / "base" / "config.json").write_text("{}")
    ns = {"profile": "tiny", "workdir": str(tmp_path)}
    built = weights.ensure_inputs(config.resolve("04", ns), show=said.append)
    assert [k for k, _ in made] == ["tuned", "adapter"] and set(built) == {"tuned_model", "adapter_path"}
    assert all("STAND-IN" in s for s in said) and len(said) == 2
    # a path given explicitly must hold a model: the preflight names it, and no stand-in is made
    from knowlm_nb import preflight
    made.clear()
    ns.update(tuned_model=str(tmp_path / "mine"))
    with pytest.raises(preflight.PreflightError, match="tuned_model"):
        weights.ensure_inputs(config.resolve("04", ns), show=said.append)
    assert made == []
