"""Test-only fault injection (issue 15: "the fault-injection hook kept behind a test-only seam").

The kill-and-resume tests run ``hpvit`` in a subprocess with this folder on ``PYTHONPATH`` and
``HPVIT_FAULT_AT_STEP=N`` set (see ``helpers.fault_env``). Python imports ``sitecustomize`` at start-up, and
this one registers an engine update hook that SIGKILLs the process right after update N, i.e. after the
checkpoint that update may write and before anything else: the crash the exact-resume guarantee is
about. With ``HPVIT_SIGINT_AT_STEP=N`` it sends SIGINT instead, as Ctrl-C in a terminal does: to the whole
process group when the process leads one (its DataLoader workers get it too), else to the process itself.
The library itself holds no fault-injection code, only the generic ``Trainer.update_hooks``.
"""

import os

_STEP = int(os.environ.get("HPVIT_FAULT_AT_STEP", "0") or 0)
_SIGINT_STEP = int(os.environ.get("HPVIT_SIGINT_AT_STEP", "0") or 0)

if _STEP or _SIGINT_STEP:
    import signal
    import sys

    from hpvit.engine.loop import Trainer

    def _kill_after(trainer, update: int) -> None:
        if update == _STEP:
            print(f"HPVIT_FAULT_AT_STEP={_STEP}: killing this process (test seam)", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if update == _SIGINT_STEP:
            print(f"HPVIT_SIGINT_AT_STEP={_SIGINT_STEP}: Ctrl-C (test seam)", file=sys.stderr, flush=True)
            if os.getpgrp() == os.getpid():
                os.killpg(os.getpgrp(), signal.SIGINT)
            else:
                os.kill(os.getpid(), signal.SIGINT)

    Trainer.update_hooks.append(_kill_after)
