"""env_check: what this machine is, and whether the chosen quantization can run on it."""

from __future__ import annotations

from omegaconf import OmegaConf

from qpipe.backends import get_backend
from qpipe.config.compose import load_group
from qpipe.dag import load_dag, pipeline_ref
from qpipe.devices.envinfo import device_facts, library_versions, measure_cuda_context_gb
from qpipe.errors import BackendUnavailable, QpipeError
from qpipe.models.source import check_weights_reachable
from qpipe.stages.base import StageContext, StageResult

# One representative option per method, to tell the user what else would run here.
_REPRESENTATIVES = {
    "none": "none",
    "bnb": "bnb_nf4",
    "gptq": "gptq",
    "awq": "awq",
    "rtn": "rtn",
    "auto": "auto",
}


def _loads_weights(dag_name: str) -> bool:
    return any(
        spec.module.rsplit(".", 1)[-1] in ("baseline", "quantize", "load")
        for spec in load_dag(dag_name).stages.values()
    )


def run(ctx: StageContext) -> StageResult:
    cfg, settings = ctx.cfg, ctx.settings
    device = settings.device
    quant = settings.quant.as_dict()

    facts = device_facts(device)
    facts["libraries"] = library_versions()
    facts["cuda_context_gb"] = measure_cuda_context_gb(device)

    runnable = {}
    for method, option in _REPRESENTATIVES.items():
        if method == quant["method"]:
            runnable[method] = get_backend(method).unavailable_reason(quant, device) or "ok"
            continue
        try:
            probe = OmegaConf.to_container(load_group("quant", option), resolve=True)
            runnable[method] = get_backend(method).unavailable_reason(probe, device) or "ok"
        except (ImportError, QpipeError) as err:  # another method's library may be missing
            runnable[method] = str(err)
    reason = runnable[quant["method"]]
    if reason != "ok":
        raise BackendUnavailable(f"quant={quant['name']} cannot run on {device}: {reason}")

    if _loads_weights(pipeline_ref(cfg)):
        check_weights_reachable(cfg.model)

    facts.update(dtype=settings.dtype_name, kernel=settings.kernel, backends=runnable)
    # The kernel setting only matters to checkpoints qpipe runs itself; the others name the
    # matmuls they do run on.
    kernels = get_backend(quant["method"]).kernels
    used_kernel = settings.kernel if settings.kernel in kernels else kernels[0]
    params = {
        "device.name": facts.get("gpu_name", "cpu"),
        "kernel": used_kernel,
        "dtype": facts["dtype"],
    }
    params.update({f"lib.{k}": v for k, v in facts["libraries"].items()})
    return StageResult(outputs=facts, params=params)
