"""Halda, the layer-to-device planner, and the analytic cost model every scheduler is scored with."""
