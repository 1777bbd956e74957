"""Inputs of a run: data sets and base models fetched or built (the built-in ones), and checked."""
