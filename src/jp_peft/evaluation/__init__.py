"""Downstream evaluation through lm-evaluation-harness, offline: bundled Japanese/English task sets,
lm-eval's Japanese leaderboard and English tasks on local data, and greedy generation samples.

    tasks.py       which tasks exist, where their data is, the include directory lm-eval reads
    harness.py     evaluate(model, adapter, tasks) -> results record (results.json)
    generation.py  greedy answers to the bundled Japanese prompts
    suite.py       the experiment's eval stage: spec checked up front, base/cpt/sft scored
    summary.py     JA/EN averages, gain and forgetting in points (the stage, the table, compare)
    wandb_log.py   the eval stage's W&B tables and summary metrics
"""
