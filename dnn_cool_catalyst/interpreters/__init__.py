"""Interpreters of a traced `FlowGraph`: one module per product."""
