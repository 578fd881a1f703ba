"""Writers of docs/results pages (markdown tables, plots, verdicts) for reproductions whose
measuring and reporting are split: `experiments.reproduce.NAME` measures and calls
`experiments.results_pages.NAME` to render what it measured."""
