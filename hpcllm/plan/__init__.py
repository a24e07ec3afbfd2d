"""Pre-flight estimate: memory per GPU and per node, time, disk; refuse or warn before submission."""
from hpcllm.plan.estimate import Estimate, count_params, estimate
from hpcllm.plan.layout import choose_layout, rank_layouts
from hpcllm.plan.report import PreflightRefused, capacity_line, format_table, preflight

__all__ = ["Estimate", "PreflightRefused", "capacity_line", "choose_layout", "count_params", "estimate",
           "format_table", "preflight", "rank_layouts"]
