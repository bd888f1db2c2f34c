"""ssmkit.integrations: ssmkit's kernels inside other libraries' models (``transformers``).

Each submodule imports its library when it is enabled, never at ``import ssmkit``.
"""
