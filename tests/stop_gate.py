"""Run an example script with its clean-stop check held at one step until the process is asked to stop.

    python tests/stop_gate.py STEP SCRIPT [ARGS...]

At step STEP, after its checkpoint is written, ``common.stop_if_asked`` waits until this process got SIGTERM /
SIGINT (at most ``GATE_TIMEOUT_S``), then runs as usual. The kill/resume test sends the signal once that checkpoint
exists: without the gate, a fast run on a busy machine could finish its remaining steps before the signal lands.
"""

from __future__ import annotations

import importlib.util
import sys
import time

GATE_TIMEOUT_S = 600.0


def main() -> int:
    step, script, *argv = sys.argv[1:]
    spec = importlib.util.spec_from_file_location("gated_example", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)              # defines main(); `import common` is the script's own
    common = module.common
    check = common.stop_if_asked

    def gated(accelerator, state, checkpoints, *rest, **options) -> None:  # noqa: ANN001
        if state.completed_steps == int(step):
            deadline = time.monotonic() + GATE_TIMEOUT_S
            while common._stop_request["signum"] is None and time.monotonic() < deadline:
                time.sleep(0.01)
        check(accelerator, state, checkpoints, *rest, **options)

    common.stop_if_asked = gated
    return common.run_cli(module.main, argv)


if __name__ == "__main__":
    sys.exit(main())
