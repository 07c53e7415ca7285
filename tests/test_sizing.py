"""Notebook 02's sizing: every formula checked on small inputs worked out by
hand, and the 13B claims the notebook makes computed, not restated."""
import json

import pytest

from knowlm_nb import ROOT, sizing

GIB = 2 ** 30
# A small Llama: vocab 100, hidden 16, MLP 32, 2 layers, 4 heads of 4, 2 KV heads (KV width 8).
SMALL = {"vocab_size": 100, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
         "tie_word_embeddings": False}


def test_model_size_counts_a_small_llama_by_hand():
    # per layer: q 16x16 + k 16x8 + v 16x8 + o 16x16 + MLP 3 x 16x32 + 2 norms of 16 = 2,336
    # embeddings 100x16 + head 100x16 + 2 layers + final norm 16 = 7,888
    assert sizing.model_size(SMALL) == (7_888, 1_600)
    # a tied head is counted once
    assert sizing.model_size({**SMALL, "tie_word_embeddings": True}) == (6_288, 1_600)
    # a wide MLP becomes the largest layer: 16 x 200 = 3,200 per projection
    total, largest = sizing.model_size({**SMALL, "intermediate_size": 200})
    assert largest == 3_200 and total == 7_888 + 2 * 3 * 16 * (200 - 32)


def test_model_size_matches_a_real_model_at_tiny_size():
    from transformers import AutoConfig, AutoModelForCausalLM

    base = ROOT / "data_samples" / "tiny_base"
    cfg = AutoConfig.from_pretrained(base, local_files_only=True)
    shape = {k: getattr(cfg, k) for k in sizing.LLAMA_13B}
    model = AutoModelForCausalLM.from_config(cfg)
    assert sizing.model_size(shape) == (sum(p.numel() for p in model.parameters()),
                                        cfg.vocab_size * cfg.hidden_size)
    assert sizing.model_size(shape)[0] == json.loads((base / "recipe.json").read_text())["parameters"]


def test_batch_throughput_and_activations_by_hand():
    b = sizing.batch_arithmetic(micro_batch=5, grad_accum=4, gpus=6, seq_len=100)
    assert b["global_batch"] == 120 and b["tokens_per_step"] == 12_000
    t = sizing.throughput(12_000, seconds_per_step=60.0, gpus=6)
    assert t["tokens_per_second"] == pytest.approx(200.0)
    assert t["tokens_per_second_per_gpu"] == pytest.approx(200 / 6)
    assert t["tokens_per_day"] == pytest.approx(200 * 86_400)
    # 2 x 1,024 x 512 values per layer, 4 layers, 2 bytes: 8 MiB
    assert sizing.activation_memory(2, 1024, 512, 4) == pytest.approx(8 / 1024)
    assert sizing.activation_memory(2, 1024, 512, 4, bytes_per_value=4) == pytest.approx(16 / 1024)


def test_mfu_by_hand():
    # 6 x 1,000 + 12 x 2 layers x 16 hidden x 8 positions = 9,072 FLOPs a token;
    # 10 tokens/s is 90,720 FLOP/s against a peak of 1e-7 TFLOPS = 100,000 FLOP/s
    m = sizing.mfu(params=1_000, tokens_per_second_per_gpu=10.0, peak_tflops=1e-7,
                   layers=2, hidden=16, seq_len=8)
    assert m["flops_per_token"] == 9_072
    assert m["achieved_tflops_per_gpu"] == pytest.approx(90_720 / 1e12)
    assert m["mfu"] == pytest.approx(0.9072)
    assert m["hfu_with_recompute"] == pytest.approx((9_072 + 2_000) * 10 / 100_000)


def test_zero_memory_follows_deepspeeds_formulas():
    n, largest = 1_000_000_000, 50_000_000
    rows = {r["setup"]: r for r in sizing.zero_memory(n, largest, num_nodes=2, gpus_per_node=4,
                                                      gpu_memory_gib=3.0)}
    assert list(rows) == ["ZeRO-2", "ZeRO-2 + offload optimizer", "ZeRO-3",
                          "ZeRO-3 + offload optimizer", "ZeRO-3 + offload optimizer and params"]
    # ZeRO-2: fp16 weights whole on every GPU (2 bytes) + 18 bytes a parameter over 8 GPUs
    assert rows["ZeRO-2"]["gpu_gib"] == pytest.approx((2 * n + 18 * n / 8) / GIB)
    # ZeRO-3: the largest layer gathered in fp32 + 18 bytes a parameter over 8 GPUs
    assert rows["ZeRO-3"]["gpu_gib"] == pytest.approx((4 * largest + 18 * n / 8) / GIB)
    # all offloaded: only the largest layer stays on the GPU
    assert rows["ZeRO-3 + offload optimizer and params"]["gpu_gib"] == pytest.approx(4 * largest / GIB)
    # on 3 GiB GPUs: ZeRO-2 needs 3.96 GiB and does not fit, ZeRO-3 needs 2.28 and does
    assert rows["ZeRO-2"]["fits_gpu"] is False and rows["ZeRO-3"]["fits_gpu"] is True
    assert rows["ZeRO-3"]["left_for_activations_gib"] == pytest.approx(3.0 - 2.45e9 / GIB)
    for r in rows.values():
        assert r["fits_gpu"] == (r["gpu_gib"] < 3.0)


def test_size_real_run_uses_the_run_it_is_given():
    run = {"num_nodes": 1, "gpus_per_node": 2, "micro_batch": 3, "grad_accum": 2, "seq_len": 8,
           "seconds_per_step": 4.0, "gpu_memory_gib": 1.0}
    s = sizing.size_real_run(run, SMALL, peak_tflops=1.0)
    assert (s["parameters"], s["largest_layer_parameters"]) == (7_888, 1_600)
    assert (s["gpus"], s["global_batch"], s["tokens_per_step"]) == (2, 12, 96)
    assert s["tokens_per_second_per_gpu"] == pytest.approx(96 / 4 / 2)
    assert s["flops_per_token"] == 6 * 7_888 + 12 * 2 * 16 * 8
    assert s["mfu"] == pytest.approx(s["flops_per_token"] * 12 / 1e12)
    assert s["activations_gib_checkpointed"] == pytest.approx(3 * 8 * 16 * 2 * 2 / GIB)
    assert s["run_seconds_per_step"] == 4.0 and all(r["fits_gpu"] for r in s["memory"])


def test_why_knowlm_needed_zero3():
    """The notebook's claim, computed by DeepSpeed's estimators on LLaMA-13B's
    shape: ZeRO-2's model states alone overflow a 32 GiB V100, ZeRO-3's fit."""
    s = sizing.size_real_run()
    assert s["parameters"] == 13_015_864_320  # LLaMA-13B's published count, from the meta model
    mem = {r["setup"]: r for r in s["memory"]}
    assert not mem["ZeRO-2"]["fits_gpu"] and mem["ZeRO-3"]["fits_gpu"]
