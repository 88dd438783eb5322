import torch, copy, time
from transformers import AutoModelForCausalLM, Qwen3Config
from qpipe.kernels import QuantLinear
from qpipe.kernels.fusion import fuse_projections
from qpipe.kernels.triton_w4a16 import DirectLauncher
cfg = Qwen3Config(hidden_size=1024, intermediate_size=3072, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=128, vocab_size=1000)
m = AutoModelForCausalLM.from_config(cfg).eval().to("cuda", torch.bfloat16)
for name, mod in list(m.named_modules()):
    if isinstance(mod, torch.nn.Linear) and name != "lm_head":
        p, _, leaf = name.rpartition(".")
        setattr(m.get_submodule(p), leaf, QuantLinear.from_linear(mod, group_size=128, symmetric=False, kernel="triton"))
fuse_projections(m)
from qpipe import decode
ids = torch.randint(0, 1000, (1, 16)).cuda()
t = decode.measure(m, {"input_ids": ids}, 8, compiled=False, repeats=1)
built = [v is not None for q in m.modules() if isinstance(q, QuantLinear) for v in q._launchers.values()]
print("launchers", sum(built), "of", len(built), "refused:", DirectLauncher.refused, "eager tok/s", t.decode_tok_s)
