"""Data: the example schema, readers (``megatron_grm.data.readers``), the arithmetic demo task,
tokenizers and packing. Only the light schema is imported here; import heavier modules directly."""

from megatron_grm.data.examples import Example, ExampleError, Turn

__all__ = ["Example", "ExampleError", "Turn"]
