"""samkit's benchmarks: the scripts behind BENCHMARKS.md (``python benchmarks/run.py [--quick] [--json PATH]``).

Each module measures one thing and returns rows of ``{key: value}`` with the details behind them:

    step_cost      SAM step / SGD step (the price of the second pass, and samkit's overhead beyond it)
    perturb_cost   first_step + restore vs an SGD(momentum) update; foreach vs a per-tensor loop
    msam_cost      mSAM (k micro-batches) vs SAM, loop and vmap backends, and the small-batch floor
    hessian_cost   HVPs to λmax: power iteration vs Lanczos
    memory         peak memory of a SAM step vs an SGD step (measured and analytic)

and the pieces they share: ``timing`` (interleaved rounds, median of paired ratios), ``allocator`` (page
faults, glibc told to keep freed memory), ``workloads`` (models, batches, parameter sets) and
``reference_sam`` (the per-tensor loop that samkit's foreach path is measured against).

Ratios are taken side by side in one process, variants interleaved (A, B, B, A, ...), medians of repeats.
"""
