"""The core: the mechanism contract, the registry of mechanisms and tasks, plain names, results
records and statistics. Depends on nothing else in ``harness``; every other room builds on it.

A mechanism file needs only this room::

    from harness.core import Attention, AttentionContext, register_mechanism
"""

from harness.core.attention import (
    CAPABILITIES,
    Attention,
    AttentionContext,
    Capabilities,
    ContractViolation,
    UnsupportedCapability,
    allowed_mask,
    causal_mask,
    computes_softmax,
    dense_attention_oracle,
    draw_generator,
    draw_seed,
    instance_seed,
    zero_padded,
)
from harness.core.names import UnsafeName, check_safe_name
from harness.core.registry import (
    FAMILIES,
    UnknownNameError,
    create_mechanism,
    create_task,
    describe,
    discover,
    get_mechanism,
    get_task,
    list_mechanisms,
    list_tasks,
    plugin_errors,
    register_mechanism,
    register_task,
)
from harness.core.results import SCHEMA_VERSION, STATUSES, Result, read_results, write_json_atomic

__all__ = [
    "CAPABILITIES",
    "FAMILIES",
    "SCHEMA_VERSION",
    "STATUSES",
    "Attention",
    "AttentionContext",
    "Capabilities",
    "ContractViolation",
    "Result",
    "UnknownNameError",
    "UnsafeName",
    "UnsupportedCapability",
    "allowed_mask",
    "causal_mask",
    "check_safe_name",
    "computes_softmax",
    "create_mechanism",
    "create_task",
    "dense_attention_oracle",
    "describe",
    "discover",
    "draw_generator",
    "draw_seed",
    "get_mechanism",
    "get_task",
    "instance_seed",
    "list_mechanisms",
    "list_tasks",
    "plugin_errors",
    "read_results",
    "register_mechanism",
    "register_task",
    "write_json_atomic",
    "zero_padded",
]
