"""Textual components of the explorer: screens, widgets, the colour scale, help.

Nothing here imports torch: models are reached only through `forkview.pipeline`
inside worker threads.
"""
