"""hetero: run the memory processing of long-context LLM inference across heterogeneous devices.

    import hetero
    from hetero.methods import PageSparseAttention

    hetero.devices()                      # what is present: torch:cpu, opencl:0:0, ...
    pipe = hetero.Pipeline(PageSparseAttention(budget_tokens=2048),
                           placement={"prepare": "torch:cpu", "relevancy": "opencl:0:0",
                                      "retrieval": "opencl:0:0", "apply": "torch:cpu"})
    memory = pipe.prepare(keys, values)   # [batch, kv_heads, seq, head_dim]
    out = pipe.step(query, memory)        # [batch, q_heads, head_dim]
    pipe.last_run.rows()                  # per-step device times and transfers

    plan = hetero.place(PageSparseAttention(), dict(context=131072), devices=["model:mi210", "model:u55c"])
    print(plan.explain())                 # where each step should run, and why

    with hetero.profile() as prof:        # every step and transfer on one clock
        pipe.step(query, memory)
    print(prof.summary()); prof.export_trace("trace.json")   # open in Perfetto
"""

from . import methods
from .devices import Device, DeviceNotFoundError, backend_problems, devices, get_device
from .records import RunRecord, StepRecord, TransferRecord
from .runtime import STEPS, Pipeline, Placement, PlacementError, Step
from . import cost, profiling
from .cost import place
from .profiling import profile

__version__ = "0.1.0"

__all__ = [
    "Device", "DeviceNotFoundError", "Pipeline", "Placement", "PlacementError", "RunRecord", "STEPS", "Step",
    "StepRecord", "TransferRecord", "backend_problems", "cost", "devices", "get_device", "methods", "place",
    "profile", "profiling",
]
