"""Sizing KnowLM's real pretraining run: memory per ZeRO setup, batch, throughput and MFU.

Stage 02's arithmetic for LLaMA-13B on 3 nodes x 8 V100-32GB, each piece a
function of its inputs so it can be checked by hand on other numbers:

* :func:`model_size` counts a Llama's parameters on the meta device (no memory);
* :func:`zero_memory` asks DeepSpeed's own estimators what ZeRO-2 / ZeRO-3
  (with and without offload) need per GPU and per node;
* :func:`activation_memory`, :func:`batch_arithmetic`, :func:`throughput` and
  :func:`mfu` are the formulas; :func:`size_real_run` applies them to
  :data:`KNOWLM_RUN` and :data:`LLAMA_13B`.
"""
from __future__ import annotations

from typing import Mapping

#: KnowLM's pretraining run as published: LLaMA-13B, 3 nodes x 8 V100-32GB,
#: micro batch 20 x accumulation 3, samples of <= 1024 tokens, about 260 s a step.
KNOWLM_RUN = {"num_nodes": 3, "gpus_per_node": 8, "micro_batch": 20, "grad_accum": 3,
              "seq_len": 1024, "seconds_per_step": 260.0, "gpu_memory_gib": 32.0}
GIB = 2 ** 30  # memory in GiB, like DeepSpeed's printouts (a "32 GB" V100 has 32 GiB)
#: LLaMA-13B's shape (its config.json).
LLAMA_13B = {"vocab_size": 32000, "hidden_size": 5120, "intermediate_size": 13824,
             "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40,
             "max_position_embeddings": 2048, "tie_word_embeddings": False}
#: V100-SXM2 peak dense fp16 with tensor cores (NVIDIA's data sheet; PCIe: 112).
V100_PEAK_TFLOPS = 125.0


def model_size(shape: Mapping | None = None) -> tuple[int, int]:
    """(parameters, parameters of the largest layer) of a Llama of ``shape``.

    The model is built on the meta device (no memory). DeepSpeed's own
    ``model_to_params`` cannot be used on it: it tells shared parameters apart
    by storage address, and every meta tensor has address 0.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**(shape or LLAMA_13B)))
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def zero_memory(total_params: int, largest_layer_params: int, num_nodes: int,
                gpus_per_node: int, gpu_memory_gib: float) -> list[dict]:
    """DeepSpeed's estimates of model-state memory (params, grads, Adam) per
    GPU and per node's CPU RAM, in GiB, for ZeRO-2 / ZeRO-3 with and without
    offload. Model states only: activations come on top (see
    :func:`activation_memory`). Without offload, the CPU figure is what each
    node needs while the processes load the model.
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    kw = dict(num_gpus_per_node=gpus_per_node, num_nodes=num_nodes)
    rows = []
    for offload in (False, True):
        cpu, gpu = estimate_zero2_model_states_mem_needs(total_params, cpu_offload=offload, **kw)
        rows.append({"setup": "ZeRO-2" + (" + offload optimizer" if offload else ""),
                     "gpu_gib": gpu / GIB, "cpu_gib_per_node": cpu / GIB})
    for offload, offload_params in ((False, False), (True, False), (True, True)):
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total_params, largest_layer_params, cpu_offload=offload,
            cpu_offload_params=offload_params, **kw)
        name = "ZeRO-3" + ("" if not offload else " + offload optimizer" if not offload_params
                           else " + offload optimizer and params")
        rows.append({"setup": name, "gpu_gib": gpu / GIB, "cpu_gib_per_node": cpu / GIB})
    for row in rows:
        row["fits_gpu"] = row["gpu_gib"] < gpu_memory_gib
        row["left_for_activations_gib"] = gpu_memory_gib - row["gpu_gib"]
    return rows


def activation_memory(micro_batch: int, seq_len: int, hidden: int, layers: int,
                      bytes_per_value: int = 2) -> float:
    """GiB per GPU kept by gradient checkpointing: each layer's input, one
    ``micro_batch x seq_len x hidden`` tensor in fp16 (the recompute
    working set of one layer comes on top)."""
    return micro_batch * seq_len * hidden * layers * bytes_per_value / GIB


def batch_arithmetic(micro_batch: int, grad_accum: int, gpus: int, seq_len: int) -> dict:
    """Global batch = micro batch x accumulation x GPUs; tokens per step."""
    global_batch = micro_batch * grad_accum * gpus
    return {"micro_batch": micro_batch, "grad_accum": grad_accum, "gpus": gpus,
            "global_batch": global_batch, "tokens_per_step": global_batch * seq_len}


def throughput(tokens_per_step: int, seconds_per_step: float, gpus: int) -> dict:
    """Tokens per second (all GPUs and per GPU) and per day, from a step's tokens and seconds."""
    tps = tokens_per_step / seconds_per_step
    return {"tokens_per_second": tps, "tokens_per_second_per_gpu": tps / gpus,
            "tokens_per_day": tps * 86400}


def mfu(params: int, tokens_per_second_per_gpu: float, peak_tflops: float,
        layers: int, hidden: int, seq_len: int) -> dict:
    """Model FLOPs utilisation: training costs about 6 FLOPs per parameter per
    token (forward 2, backward 4) plus attention's 12 x layers x hidden x
    seq_len; recomputing activations (gradient checkpointing) spends a further
    forward (2N) that does not count as model FLOPs but does as hardware FLOPs."""
    per_token = 6 * params + 12 * layers * hidden * seq_len
    achieved = per_token * tokens_per_second_per_gpu
    hardware = (per_token + 2 * params) * tokens_per_second_per_gpu
    return {"flops_per_token": per_token, "achieved_tflops_per_gpu": achieved / 1e12,
            "mfu": achieved / (peak_tflops * 1e12), "hfu_with_recompute": hardware / (peak_tflops * 1e12)}


def size_real_run(run: Mapping | None = None, shape: Mapping | None = None,
                  peak_tflops: float = V100_PEAK_TFLOPS) -> dict:
    """KnowLM's 13B run, sized: memory per setup, batch, throughput, MFU."""
    run = {**KNOWLM_RUN, **(run or {})}
    shape = {**LLAMA_13B, **(shape or {})}
    total, largest = model_size(shape)
    gpus = run["num_nodes"] * run["gpus_per_node"]
    batch = batch_arithmetic(run["micro_batch"], run["grad_accum"], gpus, run["seq_len"])
    speed = throughput(batch["tokens_per_step"], run["seconds_per_step"], gpus)
    util = mfu(total, speed["tokens_per_second_per_gpu"], peak_tflops,
               shape["num_hidden_layers"], shape["hidden_size"], run["seq_len"])
    return {"parameters": total, "largest_layer_parameters": largest,
            "memory": zero_memory(total, largest, run["num_nodes"], run["gpus_per_node"],
                                  run["gpu_memory_gib"]),
            "activations_gib_checkpointed": activation_memory(
                run["micro_batch"], run["seq_len"], shape["hidden_size"], shape["num_hidden_layers"]),
            **batch, **speed, **util, "peak_tflops": peak_tflops, **{f"run_{k}": v for k, v in run.items()}}
