"""Profiling: a timeline of every step and transfer on one clock, energy (measured where a
counter exists, modeled otherwise, always labeled), reports, Perfetto traces and plots.

    with hetero.profile() as prof:
        out = pipe.step(query, memory)
    print(prof.summary())
    prof.export_trace("trace.json")
"""

from .energy import EnergyReading, Meter, MeterAbsent, energy_meters, measure_energy
from .report import Energy, Summary
from .timeline import Event, Profile, profile

__all__ = ["Energy", "EnergyReading", "Event", "Meter", "MeterAbsent", "Profile", "Summary", "energy_meters",
           "measure_energy", "profile"]
