"""Variants: one backbone adapter + one action head each, in small configuration/modeling file pairs."""
