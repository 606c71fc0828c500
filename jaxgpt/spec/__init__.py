"""The specification both twins share: configs, the variant registry, constants and the lr schedule.

Standard library only, so that torch_ref (and an exported model folder, which carries copies of these files)
runs without JAX. The modules import each other relatively for the same reason.
"""
