"""A DDP rank as torchrun starts it: `python -m worker.ddp_rank JOB_ID OWNER`, then worker.training's main.

torchrun starts each rank in a session of its own, so the supervisor's killpg of torchrun's group (cancel, time
limit, lease loss) does not reach it: a rank dies with torchrun instead (PR_SET_PDEATHSIG), however torchrun ends.
It asks for that before anything else, here, and not in worker.training: the seconds a rank spends importing
torch and transformers are seconds in which a time limit or a cancel would otherwise leave an orphan.
"""

from core.processes import die_with_parent

if __name__ == "__main__":
    die_with_parent()
    from worker.training import main

    main()
