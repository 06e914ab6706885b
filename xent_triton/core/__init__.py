"""Shared code below the op packages: options, inputs, reduction, runtime and launch policy, the jit
formulas and their torch twins, partials, the layout exchange, DTensor placement rules."""
