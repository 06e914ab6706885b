"""Integrations of xent_triton with training frameworks, each a module imported on demand.

* ``xent_triton.integrations.transformers`` (``from xent_triton.integrations import transformers as xhf``):
  Hugging Face transformers (logits-path loss, fused LM head on a model instance) and TRL's fused LM
  head. Needs the ``[hf]`` extra. See docs/integrations.md.
* the other modules of this package: one framework each (see their docstrings).

Importing ``xent_triton`` or this package imports none of the frameworks.
"""
