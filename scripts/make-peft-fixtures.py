#!/usr/bin/env python3
"""Generates tests/fixtures/peft/<case>/ with Hugging Face PEFT itself (run through
scripts/make-peft-fixtures.sh, which pins peft/torch/transformers in .venv-peft/).

Everything is built locally from tiny random configs (LlamaForCausalLM, GPT2LMHeadModel); nothing is
fetched from a model hub. Per case:
  base.safetensors             the base model's state dict, in the case's dtype
  adapter/adapter_config.json  PEFT's own save_pretrained output
  adapter/adapter_model.safetensors
  merged.safetensors           PEFT's merge_and_unload() state dict (CPU)
  forward.safetensors          per probed LoRA layer: <module>.x, <module>.y_base (base layer output),
                               <module>.y (PEFT LoRA layer output, eval mode: dropout off)
The Rust tests (tests/peft.rs) check our loader, merge and forward against these files.
"""
import json
import os
import shutil
import sys

import torch
import peft
import transformers
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "peft")
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def tiny_llama():
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=16, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        tie_word_embeddings=False))


def tiny_gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=16, n_embd=32, n_layer=1, n_head=4))


def state(model):
    # Tied tensors (GPT-2's lm_head = wte) would make save_file refuse: store copies.
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def make_case(name, model_fn, dtype, config_kw, probes, autocast_adapter_dtype, seed):
    torch.manual_seed(seed)
    out = os.path.join(ROOT, name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    base = model_fn().to(DTYPES[dtype]).eval()
    save_file(state(base), os.path.join(out, "base.safetensors"), metadata={"format": "pt"})
    cfg = LoraConfig(init_lora_weights=False, **config_kw)
    model = get_peft_model(base, cfg, autocast_adapter_dtype=autocast_adapter_dtype).eval()
    # Random A and B large enough that the delta matters at the dtype's resolution.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A" in n:
                p.copy_(torch.randn_like(p, dtype=torch.float32).to(p.dtype) * 0.3)
            elif "lora_B" in n:
                p.copy_(torch.randn_like(p, dtype=torch.float32).to(p.dtype) * 0.05)
    model.save_pretrained(os.path.join(out, "adapter"), safe_serialization=True)
    for junk in ("README.md",):
        p = os.path.join(out, "adapter", junk)
        if os.path.exists(p):
            os.remove(p)
    fwd = {}
    with torch.no_grad():
        modules = dict(model.base_model.model.named_modules())
        for m in probes:
            layer = modules[m]
            d_in = layer.base_layer.weight.shape[1 if not config_kw.get("fan_in_fan_out") else 0]
            x = (torch.randn(3, d_in) * 0.5).to(DTYPES[dtype])
            fwd[m + ".x"] = x
            fwd[m + ".y_base"] = layer.base_layer(x).contiguous()
            fwd[m + ".y"] = layer(x).contiguous()
    save_file(fwd, os.path.join(out, "forward.safetensors"))
    merged = model.merge_and_unload()
    save_file(state(merged), os.path.join(out, "merged.safetensors"), metadata={"format": "pt"})
    print(f"{name}: done", file=sys.stderr)


def main():
    L = "model.layers.{}.{}"
    make_case(
        "llama_f32_rslora_patterns", tiny_llama, "f32",
        dict(r=8, lora_alpha=16, use_rslora=True, lora_dropout=0.1,
             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
             rank_pattern={"layers.1.self_attn.q_proj": 4, "down_proj": 2},
             alpha_pattern={"v_proj": 4, "model.layers.0.mlp.up_proj": 40}),
        [L.format(0, "self_attn.q_proj"), L.format(1, "self_attn.q_proj"), L.format(0, "mlp.down_proj")],
        True, 1)
    make_case(
        "llama_f16_regex", tiny_llama, "f16",
        dict(r=4, lora_alpha=8, target_modules=r".*\.(q_proj|v_proj|down_proj)",
             rank_pattern={"model.layers.1.mlp.down_proj": 6}, alpha_pattern={"q_proj": 2}),
        [L.format(0, "self_attn.q_proj"), L.format(1, "mlp.down_proj")],
        False, 2)
    make_case(
        "llama_bf16", tiny_llama, "bf16",
        dict(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj", "up_proj"],
             alpha_pattern={"up_proj": 8}),
        [L.format(0, "self_attn.v_proj"), L.format(1, "mlp.up_proj")],
        False, 3)
    make_case(
        "llama_bf16_f32_adapter", tiny_llama, "bf16",
        dict(r=8, lora_alpha=8, use_rslora=True, target_modules=["o_proj", "gate_proj"]),
        [L.format(0, "self_attn.o_proj")],
        True, 4)
    make_case(
        "gpt2_f32_fan_in_fan_out", tiny_gpt2, "f32",
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
        ["transformer.h.0.attn.c_attn"],
        True, 5)
    with open(os.path.join(ROOT, "VERSIONS.json"), "w") as f:
        json.dump({"peft": peft.__version__, "torch": torch.__version__,
                   "transformers": transformers.__version__,
                   "generator": "scripts/make-peft-fixtures.py (real PEFT)"}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
