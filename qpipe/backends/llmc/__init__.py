"""GPTQ, AWQ and RTN through llm-compressor, shared by the three backends, one module a job:

- ``method``: what each method states about itself, looked up by ``quant.method``;
- ``validation``: what a ``quant`` value may be (cheap, before any weight is touched);
- ``recipe``: the llm-compressor recipe as plain data, from each method's modifiers;
- ``calibration``: the token windows ``oneshot`` calibrates on, the source's tokenizer;
- ``oneshot``: one quantization run, from the source folder to the saved checkpoint;
- ``checkpoint``: the compressed-tensors folder, with its recipe and tokenizer;
- ``layers``: where the targets sit (Linear layers, decoder blocks);
- ``backend``: ``LlmcBackend``, the shared shape, its grouped-integer weight format, and the
  facts each method overrides;
- ``patches``: the workarounds applied to llm-compressor.

What is particular to a method lives on its backend class: ``gptq.py`` (GPTQModifier and its
options), ``awq.py`` (AWQModifier, its mappings and options), ``fp8.py`` (FP8 weights and
dynamic activations, their own format and kernel); RTN's plain QuantizationModifier is
``LlmcBackend``'s default.
"""

from qpipe.backends.llmc.backend import LlmcBackend
from qpipe.backends.llmc.calibration import calibration_texts, source_tokenizer
from qpipe.backends.llmc.oneshot import quantize_with_llmc
from qpipe.backends.llmc.recipe import build_recipe, config_groups, recipe_yaml
from qpipe.backends.llmc.validation import (
    CT_FORMAT,
    LEGAL_GROUP_SIZES,
    llmcompressor_missing,
    validate_quant,
)

__all__ = [
    "CT_FORMAT",
    "LEGAL_GROUP_SIZES",
    "LlmcBackend",
    "build_recipe",
    "calibration_texts",
    "config_groups",
    "llmcompressor_missing",
    "quantize_with_llmc",
    "recipe_yaml",
    "source_tokenizer",
    "validate_quant",
]
