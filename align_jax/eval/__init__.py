"""Evaluation: what each stage did to a model.

reward.py       RewardScorer: rewards of (prompt, response) pairs and pair accuracy under a trained RM
constraints.py  verifiable instruction following (IFEval-style checks) on bundled prompt sets (data/)
constraint_checks.py  the checks themselves (the registry constraints.py scores with)
ifeval.py       IFEval in its own input format, scored as the official code does (strict and loose)
ifeval_checks.py, ifeval_text.py  its 25 instruction checks and the text units they count
perplexity.py   perplexity on held-out SFT chats, through the SFT data pipeline
winrate.py      mean reward of greedy responses and win rate against a reference, under a reward model
suite.py        evaluate_model: all of the above as one flat dict of metrics (the pipeline's eval stage)
report.py       WORKDIR/report/: a markdown table of every metric after every stage, and PNG plots
"""
