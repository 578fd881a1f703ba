"""Paper reproductions: each `python -m experiments.reproduce.NAME` trains and measures what a
paper claims at this codebase's scale and writes docs/results/NAME.md (table, plot, a verdict
per headline claim: reproduced / not at this scale / contradicted)."""
