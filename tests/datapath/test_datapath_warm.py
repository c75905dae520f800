"""The ring kernels are compiled before a back-end serves, for the very argument
types the device passes: after a server has started, split and packed
migrations (traffic both ways, logging on) add no compiled signature."""
from __future__ import annotations

import json
import subprocess
import sys

# A fresh process, so that no earlier test has compiled the kernels already.
PROBE = r"""
import json, os, tempfile
from vhostlab.backend import BackendServer
from vhostlab.frontend.migration import BuiltinMigration
from vhostlab.ring import PackedVirtqueue, Virtqueue
from vhostlab.ring.warm import kernels_loaded

kernels = {f"{cls.ring_format}.{kind}": cls._kernels["numba"][i]
           for cls in (Virtqueue, PackedVirtqueue) for i, kind in enumerate(("tx", "rx"))}
before_start = {name: len(k.signatures) for name, k in kernels.items()}
loaded_before = kernels_loaded()
with tempfile.TemporaryDirectory() as d:
    BackendServer(os.path.join(d, "vu.sock")).start().stop()
after_start = {name: len(k.signatures) for name, k in kernels.items()}
results = [BuiltinMigration(rounds=2, frames_per_round=8).run()]
packed = BuiltinMigration(ring="packed", rounds=2, frames_per_round=8)
results.append(packed.run())
after_traffic = {name: len(k.signatures) for name, k in kernels.items()}
print(json.dumps({"loaded_before": loaded_before, "loaded": kernels_loaded(),
                  "before_start": before_start, "after_start": after_start,
                  "after_traffic": after_traffic,
                  "integrity": [r["integrity"] for r in results],
                  "frames": [r["frames"]["delivered"] for r in results]}))
"""


def test_a_started_server_has_compiled_every_kernel_the_device_calls():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert not r["loaded_before"] and r["loaded"]
    assert all(n == 0 for n in r["before_start"].values()), r
    assert all(n >= 1 for n in r["after_start"].values()), r
    # Both migrations moved frames through every kernel, with and without the
    # log, and needed nothing the warm-up had not compiled.
    assert r["integrity"] == ["ok", "ok"] and min(r["frames"]) > 0, r
    assert r["after_traffic"] == r["after_start"], r
