"""Test-only fault injection (issue 15: "the fault-injection hook kept behind a test-only seam").

The kill-and-resume tests run ``hpvit`` in a subprocess with this folder on ``PYTHONPATH`` and
``HPVIT_FAULT_AT_STEP=N`` set (see ``helpers.fault_env``). Python imports ``sitecustomize`` at start-up, and
this one registers an engine update hook that SIGKILLs the process right after update N, i.e. after the
checkpoint that update may write and before anything else: the crash the exact-resume guarantee is
about. The library itself holds no fault-injection code, only the generic ``Trainer.update_hooks``.
"""

import os

_STEP = int(os.environ.get("HPVIT_FAULT_AT_STEP", "0") or 0)

if _STEP:
    import signal
    import sys

    from hpvit.engine.loop import Trainer

    def _kill_after(trainer, update: int) -> None:
        if update == _STEP:
            print(f"HPVIT_FAULT_AT_STEP={_STEP}: killing this process (test seam)", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    Trainer.update_hooks.append(_kill_after)
