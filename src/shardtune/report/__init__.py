"""Reporting: the summary table, plots, HTML pages, run records and the console summary."""
