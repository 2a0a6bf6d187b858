"""Closed-loop evaluation.

Forecast sources, the episode loop, the planner, suite files, safety metrics and the regression gate.
"""
