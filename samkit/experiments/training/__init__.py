"""The parts of ``samkit.experiments.trainer.train``, one concern a file (the trainer keeps ``train`` and the loop).

    state.py          TrainingState: the run's config, folder, process context, and its progress (epoch, step, times)
    folder.py         the run folder: inspect it, lock it, clear what --overwrite replaces (rank 0 decides)
    model_init.py     before any work: the names checked, the batch split checked, the model built (--init-from)
    checkpointing.py  checkpoint.pt written (every rank under FSDP2) and restored for --resume; write failures
    epoch.py          one epoch's batches (order, augmentation, mixup, this rank's slice) and its evaluation row
    summary.py        the end: the final evaluation, ok / diverged / collapsed, the cost, summary.json and the PNGs
"""
