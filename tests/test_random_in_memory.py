"""Random weights reach llm-compressor in memory: the checkpoint is the one the disk round trip
made, and the 17 GB folder (for InternVL) is never written for it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from qpipe.backends import QuantizeRequest, get_backend
from qpipe.config.compose import load_group
from qpipe.models import materialize, model_files, random_model


def _micro():
    return OmegaConf.create(
        {
            "name": "micro-llama",
            "weights": "random",
            "seed": 3,
            "random_dtype": "bfloat16",
            "model_class": "AutoModelForCausalLM",
            "config": {
                "model_type": "llama",
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "head_dim": 32,
                "vocab_size": 256,
                "tie_word_embeddings": False,
            },
        }
    )


def _quantize(source: Path, out: Path, model=None) -> dict[str, torch.Tensor]:
    quant = OmegaConf.to_container(load_group("quant", "rtn"))
    request = QuantizeRequest(
        source=source,
        model_class="AutoModelForCausalLM",
        quant={**quant, "group_size": 32},
        skip_modules=["lm_head"],
        targets=[],
        output_dir=out,
        device="cpu",
        dtype=torch.float32,
        model=model,
    )
    get_backend("rtn").quantize(request)
    return load_file(out / "model.safetensors")


def test_random_weights_quantize_in_memory_as_from_their_folder(tmp_path: Path) -> None:
    cfg = _micro()
    files = model_files(cfg)
    assert (files / "config.json").is_file() and not list(files.glob("*.safetensors"))
    model = random_model(cfg, "cpu", torch.float32)
    assert model.config._name_or_path == str(files)  # where llm-compressor re-reads config.json
    in_memory = _quantize(files, tmp_path / "mem", model)
    full = files.parent / files.name.replace("-random-files-", "-random-")
    assert not full.exists(), "the weights were written to disk"

    folder = materialize(cfg)  # the disk round trip, for comparison
    read_back = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    built = random_model(cfg, "cpu", torch.float32).state_dict()
    assert all(torch.equal(t, built[k]) for k, t in read_back.state_dict().items())
    from_disk = _quantize(folder, tmp_path / "disk")
    assert in_memory.keys() == from_disk.keys()
    assert all(torch.equal(in_memory[k], from_disk[k]) for k in in_memory)
    saved = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("mem", "disk")]
    assert saved[0] == saved[1]  # llm-compressor rewrote it from each source's config.json
