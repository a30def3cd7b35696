"""Simulators for closed-loop evaluation and demonstrations (Meta-World); needs the `sim` extra."""
