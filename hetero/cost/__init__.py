"""The cost model and the placer: device profiles (hierarchical rooflines in TOML), the cost
of each step for given shapes, transfers and energy, and `place()`.

    plan = hetero.place(PageSparseAttention(), dict(context=131072), devices=["model:mi210", "model:u55c"])
    print(plan.explain())
"""

from .model import Access, Estimate, Task, Workload, evaluate
from .placer import OBJECTIVES, Plan, place
from .profiles import (PATTERNS, DeviceProfile, LinkProfile, MemoryLevel, ProfileError, add_profiles, device_profile,
                       known_profiles, link_profile, load, loads, reload)

__all__ = ["Access", "DeviceProfile", "Estimate", "LinkProfile", "MemoryLevel", "OBJECTIVES", "PATTERNS", "Plan",
           "ProfileError", "Task", "Workload", "add_profiles", "device_profile", "evaluate", "link_profile", "known_profiles", "load",
           "loads", "place", "reload"]
