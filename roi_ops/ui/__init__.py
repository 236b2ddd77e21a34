"""``roi-ops ui``: a local web page (Gradio) to draw a layout of captioned boxes and generate its image.

Modules: :mod:`~roi_ops.ui.layouts` (the canvas value, layout JSON and checked requests; no Gradio),
:mod:`~roi_ops.ui.engine` (the model, loaded once, one call at a time; the pictures the page shows),
:mod:`~roi_ops.ui.canvas` (the box canvas component), :mod:`~roi_ops.ui.app` (the page and its handlers),
:mod:`~roi_ops.ui.command` (the subcommand). Needs the ``[ui]`` extra (gradio). docs/ui.md.
"""
