"""knowlm_nb.inference: loading paths, honest decoding presets, streaming, placement, GGUF."""
import json

import pytest

from knowlm_nb import ROOT, inference

BASE = ROOT / "data_samples" / "tiny_base"
PROMPT = "Marta Velling, a marine chemist born in Port Elsin, joined the"


@pytest.fixture(scope="module")
def fp32():
    return inference.load(BASE, "fp32")


# ------------------------------------------------------------------ loading

def test_bnb8_has_linear8bit_layers_and_generates(fp32):
    model, tok = inference.load(BASE, "bnb8")
    assert inference.count_linear8bit(model) == 4 * 7          # q k v o gate up down per layer
    assert inference.count_linear8bit(fp32[0]) == 0
    g = inference.complete(model, tok, PROMPT, max_new_tokens=4)
    assert 1 <= g.new_tokens <= 4 and g.text
    assert inference.weight_bytes(model) < 0.5 * inference.weight_bytes(fp32[0])   # int8 + fp16 rest


def test_int8_weight_memory_below_fp32_and_close_perplexity(fp32):
    model, tok = inference.load(BASE, "int8")
    full = inference.weight_bytes(fp32[0])
    assert inference.weight_bytes(model) < 0.4 * full           # int8 Linear weights + scales
    texts = inference.heldout_texts(6)
    p32 = inference.perplexity(fp32[0], fp32[1], texts)
    p8 = inference.perplexity(model, tok, texts)
    assert abs(p8 / p32 - 1) < 0.02
    assert inference.generate(model, tok, PROMPT, max_new_tokens=3)


def test_load_refuses_bad_inputs(tmp_path):
    with pytest.raises(inference.InferenceError, match="not found"):
        inference.load(tmp_path / "nope")
    with pytest.raises(inference.InferenceError, match="config.json"):
        inference.load(tmp_path)
    with pytest.raises(inference.InferenceError, match="unknown quantization"):
        inference.load(BASE, "int4")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(inference.InferenceError, match="safetensors"):
        inference.load(tmp_path)


def test_adapter_is_put_on_top(tmp_path, fp32):
    from peft import LoraConfig, get_peft_model

    model, tok = inference.load(BASE, "fp32")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.fill_(0.01)                                  # a non-zero update
    peft_model.save_pretrained(tmp_path / "adapter")
    tuned, _ = inference.load(BASE, "fp32", adapter=tmp_path / "adapter")
    assert not any("lora" in n for n, _ in tuned.named_parameters())   # merged into the weights
    w0 = fp32[0].model.layers[0].self_attn.q_proj.weight
    assert not w0.equal(tuned.model.layers[0].self_attn.q_proj.weight)
    with pytest.raises(inference.InferenceError, match="adapter_config.json"):
        inference.load(BASE, "fp32", adapter=tmp_path)


# ------------------------------------------------------------------ placement

def test_placement_builds_knowlm_allocate_arguments():
    assert inference.placement([10, 10, 10]) == {
        "device_map": "auto", "max_memory": {0: "10GiB", 1: "10GiB", 2: "10GiB"}}
    assert inference.placement([20, 8], cpu_gib=64)["max_memory"] == {
        0: "20GiB", 1: "8GiB", "cpu": "64GiB"}
    assert inference.placement(None) == {}
    kw = inference.load_kwargs("bnb8", allocate=[10, 10], cuda=True, num_gpus=2)
    assert kw["device_map"] == "auto" and kw["max_memory"] == {0: "10GiB", 1: "10GiB"}
    assert kw["quantization_config"].load_in_8bit and kw["local_files_only"] is True
    assert inference.load_kwargs("bnb8", cuda=True)["device_map"] == {"": 0}
    assert inference.load_kwargs("bnb8", cuda=False)["device_map"] == "cpu"


@pytest.mark.parametrize("allocate, message", [
    ([], "non-empty"), ("10,10", "non-empty"), ([10, -1], "positive"), ([10, True], "positive"),
    ([10, 10, 10], "3 GPU"),
])
def test_placement_refuses_bad_allocations(allocate, message):
    with pytest.raises(inference.InferenceError, match=message):
        inference.placement(allocate, num_gpus=2)


def test_allocate_without_cuda_is_an_error():
    with pytest.raises(inference.InferenceError, match="CUDA"):
        inference.load_kwargs("fp32", allocate=[10], cuda=False)


# ------------------------------------------------------------------ decoding

def test_ie_preset_is_deterministic_greedy(fp32):
    model, tok = fp32
    kw = inference.generation_kwargs("ie")
    assert kw["do_sample"] is False and "temperature" not in kw
    a = inference.generate(model, tok, PROMPT, max_new_tokens=12)
    b = inference.generate(model, tok, PROMPT, max_new_tokens=12)
    assert a == b and a
    beams = inference.generate(model, tok, PROMPT, num_beams=3, max_new_tokens=12)
    assert beams == inference.generate(model, tok, PROMPT, num_beams=3, max_new_tokens=12)


def test_chat_preset_samples_and_a_seed_repeats_it(fp32):
    model, tok = fp32
    kw = inference.generation_kwargs("chat")
    assert kw["do_sample"] is True and {"temperature", "top_p", "top_k"} <= set(kw)
    runs = {inference.generate(model, tok, PROMPT, "chat", seed=s, max_new_tokens=12, temperature=1.5)
            for s in range(4)}
    assert len(runs) > 1                                        # sampling really happens
    one = inference.generate(model, tok, PROMPT, "chat", seed=7, max_new_tokens=12)
    assert one == inference.generate(model, tok, PROMPT, "chat", seed=7, max_new_tokens=12)


@pytest.mark.parametrize("overrides", [{"temperature": 0.7}, {"top_p": 0.9}, {"top_k": 5},
                                       {"temperature": 0.2, "top_p": 0.5}])
def test_sampling_parameters_without_sampling_are_an_error(fp32, overrides):
    model, tok = fp32
    with pytest.raises(inference.InferenceError, match="do_sample=True"):
        inference.generation_kwargs("ie", **overrides)
    with pytest.raises(inference.InferenceError, match="no effect without sampling"):
        inference.generate(model, tok, PROMPT, **overrides)
    with pytest.raises(inference.InferenceError, match="no effect"):
        inference.generation_kwargs("chat", do_sample=False, **overrides)
    assert inference.generation_kwargs("ie", do_sample=True, **overrides)["do_sample"]


@pytest.mark.parametrize("name, value, message", [
    ("max_new_tokens", 0, ">= 1"), ("max_new_tokens", -5, ">= 1"), ("max_new_tokens", 2.5, "whole"),
    ("top_p", 1.5, "<= 1"), ("temperature", 0, "> 0"), ("num_beams", 0, ">= 1"),
    ("do_sample", "yes", "true or false"), ("stop", [""], "non-empty"), ("max_new_tokens", "8", "number"),
    ("temperature", float("nan"), "finite"), ("colour", 1, "unknown generation parameter"),
])
def test_bad_generation_parameters_are_named(name, value, message):
    with pytest.raises(inference.InferenceError, match=message):
        inference.generation_kwargs("chat", **{name: value})


def test_unknown_preset_and_bad_prompt(fp32):
    with pytest.raises(inference.InferenceError, match="unknown preset"):
        inference.generation_kwargs("creative")
    with pytest.raises(inference.InferenceError, match="prompt must be a string"):
        inference.generate(*fp32, ["a list"])


def test_max_new_tokens_bounds_the_answer(fp32):
    g = inference.complete(*fp32, PROMPT, max_new_tokens=5)
    assert g.new_tokens <= 5
    assert g.finish_reason in ("length", "eos")


def test_stop_strings_stop_generation(fp32):
    model, tok = fp32
    full = inference.complete(model, tok, PROMPT, max_new_tokens=24)
    assert full.finish_reason == "length" and len(full.text) > 12
    words = full.text.split()
    stop = words[len(words) // 2]                              # a word from the middle
    cut = inference.complete(model, tok, PROMPT, max_new_tokens=24, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.find(stop)]
    assert cut.new_tokens < full.new_tokens                    # generation really ended early


def test_stream_yields_the_same_text_as_generate(fp32):
    model, tok = fp32
    pieces = list(inference.stream(model, tok, PROMPT, max_new_tokens=16))
    assert len(pieces) > 1
    assert "".join(pieces) == inference.generate(model, tok, PROMPT, max_new_tokens=16)
    full = inference.generate(model, tok, PROMPT, max_new_tokens=16)
    stop = full.split()[2]
    streamed = "".join(inference.stream(model, tok, PROMPT, max_new_tokens=16, stop=[stop]))
    assert streamed == inference.generate(model, tok, PROMPT, max_new_tokens=16, stop=[stop])
    assert stop not in streamed


# ------------------------------------------------------------------ GGUF

@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_gguf_round_trip_matches_the_source(tmp_path, qtype):
    import gguf

    out = tmp_path / f"tiny-{qtype}.gguf"
    info = inference.export_gguf(BASE, out, qtype)
    assert out.is_file() and info["bytes"] == out.stat().st_size
    reader = gguf.GGUFReader(out)
    fields = reader.fields
    text = lambda k: bytes(fields[k].parts[fields[k].data[0]]).decode()  # noqa: E731
    assert text("general.architecture") == "llama"
    assert text("tokenizer.ggml.model") == "gpt2"
    assert len(fields["tokenizer.ggml.merges"].data) == info["merges"] > 1000
    assert len(reader.tensors) == 2 + 4 * 9 + 1
    check = inference.check_gguf(BASE, out, inference.heldout_texts(6))
    assert check["same_token_ids"] == 1.0                      # the tokenizer survives the trip
    if qtype == "f16":
        assert check["max_abs_logit_diff"] < 1e-2              # fp16 tolerance (weights stored fp16)
        assert check["top1_agreement"] == 1.0
        assert info["tensors"]["q8_0"] == 0
    else:
        assert info["tensors"]["q8_0"] == 4 * 7 + 2
        assert check["max_rel_logit_diff"] < 0.05              # q8_0: a few % of the logit range
        assert check["top1_agreement"] > 0.9
        assert info["bytes"] < 0.6 * (BASE / "model.safetensors").stat().st_size


def test_gguf_export_refuses_bad_input_and_leaves_nothing(tmp_path):
    with pytest.raises(inference.InferenceError, match=".gguf"):
        inference.export_gguf(BASE, tmp_path / "x.bin")
    with pytest.raises(inference.InferenceError, match="unknown GGUF type"):
        inference.export_gguf(BASE, tmp_path / "x.gguf", "q4_k")
    with pytest.raises(inference.InferenceError, match="not found"):
        inference.export_gguf(tmp_path / "missing", tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []
    assert inference.main(["export-gguf", "--model", str(tmp_path / "missing"),
                           "--out", str(tmp_path / "y.gguf")]) == 2
    assert list(tmp_path.iterdir()) == []
