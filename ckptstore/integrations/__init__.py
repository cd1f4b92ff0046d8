"""One-line use of ckptstore from the frameworks people train with.

Each module imports its framework only when it is used: ``lightning`` (a
``CheckpointIO`` plug-in), ``accelerate`` (``save_state``/``load_state``) and
``torchtitan`` (its checkpoint storage). See docs/integrations.md.
"""
