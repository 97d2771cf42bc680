"""steerscope's command line, dashboard and demo.

Importing ``app`` (the ``steerscope`` command does) asks OpenMP's idle threads to sleep rather than
spin (``OMP_WAIT_POLICY=PASSIVE``, unless set already): the CPU top-k encoder runs its selection on
its own threads between torch's GEMMs, and threads spinning after a GEMM take their cores. This only
takes effect before torch is first imported; see README, "Fused top-k kernels".
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
