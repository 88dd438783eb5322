"""env_check: what this machine is, and whether the chosen quantization can run on it."""

from __future__ import annotations

from qpipe.backends import get_backend, option_config, quant_options
from qpipe.dag import load_dag, pipeline_ref
from qpipe.devices.envinfo import device_facts, library_versions, measure_cuda_context_gb
from qpipe.errors import BackendUnavailable, QpipeError
from qpipe.models.source import check_weights_reachable
from qpipe.stages.base import StageContext, StageResult


def _stage_codes(dag_name: str) -> set[str]:
    """The built-in stages the pipeline runs (by their code, whatever they are named)."""
    return {spec.module.rsplit(".", 1)[-1] for spec in load_dag(dag_name).stages.values()}


def run(ctx: StageContext) -> StageResult:
    cfg, settings = ctx.cfg, ctx.settings
    device = settings.device
    quant = settings.quant.as_dict()

    facts = device_facts(device)
    facts["libraries"] = library_versions()
    facts["cuda_context_gb"] = measure_cuda_context_gb(device)

    # Every quant option (the user's own included): what else would run on this machine.
    backend = get_backend(quant["method"])
    reason = backend.unavailable_reason(quant, device)
    if reason:
        raise BackendUnavailable(f"quant={quant['name']} cannot run on {device}: {reason}")
    runnable = {quant["name"]: "ok"}
    for option, method in quant_options().items():
        if option in runnable:
            continue
        try:
            other = get_backend(method).unavailable_reason(option_config(option), device)
            runnable[option] = other or "ok"
        except (ImportError, QpipeError) as err:  # another method's library may be missing
            runnable[option] = str(err)

    stages = _stage_codes(pipeline_ref(cfg))
    if stages & {"baseline", "quantize", "load"}:
        check_weights_reachable(cfg.model)

    facts.update(dtype=settings.dtype_name, kernel=settings.kernel, backends=runnable)
    params = {"device.name": facts.get("gpu_name", "cpu"), "dtype": facts["dtype"]}
    if "load" not in stages:
        # What would run (its backend resolved it); a run that loads the model logs the
        # kernels its layers did run on (the load stage).
        params["kernel"] = settings.kernel
    params.update({f"lib.{k}": v for k, v in facts["libraries"].items()})
    return StageResult(outputs=facts, params=params)
