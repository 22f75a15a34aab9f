"""The run folder of one ``train`` call: inspected before any work, then claimed (locked, cleared) once every check
has passed. Rank 0 reads and writes DIR; the other ranks follow its answer (the rules: samkit.experiments.rundir)."""

from __future__ import annotations

from typing import Callable

from samkit.experiments import rundir
from samkit.experiments.training.state import TrainingState


def inspect(state: TrainingState, *, resume: bool, overwrite: bool) -> rundir.Plan:
    return rundir.inspect_run_dir(
        state.out,
        state.config.to_dict(),
        state.runtime,
        resume=resume,
        overwrite=overwrite,
        cpu=state.device.type == "cpu",
    )


def on_main(state: TrainingState, action: Callable[[], str]) -> str:
    """``action()`` (returning a string) on rank 0; its RunDirError stops every rank with rank 0's message.
    Returns rank 0's string on every rank."""
    error, result = "", ""
    if state.context.is_main:
        try:
            result = action()
        except rundir.RunDirError as refused:
            error = str(refused)
    error = state.context.broadcast_error(error)  # broadcasts any string from rank 0
    if error:
        raise rundir.RunDirError(error)
    return state.context.broadcast_error(result)


def claim(state: TrainingState, plan: rundir.Plan, *, resume: bool, overwrite: bool) -> None:
    """Every check has passed: lock DIR, check it is as inspected, remove stale temporary files, and with
    --overwrite the old run."""

    def claim_on_main() -> str:
        state.lock = rundir.RunLock.acquire(state.out)
        again = inspect(state, resume=resume, overwrite=overwrite)
        if again.action != plan.action:
            raise rundir.RunDirError(
                f"{state.out} changed while this command started (another command wrote it): run it again"
            )
        removed = rundir.apply_plan(state.out, plan)
        return ", ".join(removed)

    removed = on_main(state, claim_on_main)
    if removed:
        state.say(f"removed from {state.out}: {removed}")
    state.context.barrier()


def release(state: TrainingState) -> None:
    if state.lock is not None:
        state.lock.release()
        state.lock = None
