"""Chrome trace-event JSON (the format Perfetto and chrome://tracing open).

Complete events ("ph": "X") with microsecond `ts`/`dur`; metadata events name each process
and track and fix their order. See the Trace Event Format document (Google, "JSON Object
Format"): `traceEvents` plus optional `displayTimeUnit` and `otherData`.
"""

from __future__ import annotations

from .. import __version__

PROCESSES = {"call": (1, "pipeline calls"), "step": (2, "devices"), "transfer": (3, "transfers")}


def chrome_trace(prof) -> dict:
    events = prof.events()
    trace: list[dict] = []
    tids: dict[tuple[int, str], int] = {}
    for kind, (pid, title) in PROCESSES.items():
        trace.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": title}})
        trace.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}})
    modeled = {e.track for e in events if e.clock == "modeled"}
    for e in events:
        pid = PROCESSES[e.kind][0]
        key = (pid, e.track)
        if key not in tids:
            tids[key] = tid = len(tids) + 1
            name = f"{e.track} (modeled)" if e.track in modeled and e.kind == "step" else e.track
            trace.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}})
            trace.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid, "args": {"sort_index": tid}})
        trace.append({"ph": "X", "name": e.name, "cat": e.kind, "pid": pid, "tid": tids[key],
                      "ts": (e.start_ns - prof.start_ns) / 1e3, "dur": (e.end_ns - e.start_ns) / 1e3,
                      "args": {**e.args, "clock": e.clock}})
    return {"traceEvents": trace, "displayTimeUnit": "ms",
            "otherData": {"producer": f"hetero {__version__}",
                          "clock": "host perf_counter; device timestamps mapped onto it; ts in us since the "
                                   "profile opened",
                          "window_s": prof.window_s}}
