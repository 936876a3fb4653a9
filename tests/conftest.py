"""Suite-wide settings."""
from __future__ import annotations

import os

# Engines in the suite don't map their whole KV pool in ahead of use (heron.ops.cpu_memory.
# KVPrefaulter): many engines stay alive in module-scoped fixtures, and each prefaulted pool
# would be resident (2 GiB for the default model). Subprocesses (server tests) inherit this.
# The prefaulter's own tests turn it back on.
os.environ.setdefault("HERON_NO_KV_PREFAULT", "1")
